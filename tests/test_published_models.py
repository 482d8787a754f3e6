"""The authors' four published models against their deploy definitions (fyu/dilation
models/*_deploy.prototxt): the model each of the README's commands builds has their layers,
geometry and mean pixel, and files holding their layers load into it."""

from __future__ import annotations

import shlex

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO
from test_caffemodel import caffe_bilinear
from test_cli import print_config
from torch import nn

from dilatedseg.cli import import_class
from dilatedseg.inference import check_deploy_tiles
from dilatedseg.models.caffemodel import CaffeLayer, caffe_state_dict
from dilatedseg.module import SegmentationModule

# (name, out channels, in channels, kernel, dilation, pad) of every layer with weights, in
# network order, as the deploy definitions give them (the front-end is the same in all four).
VGG = [("conv1_1", 64, 3, 3, 1, 0), ("conv1_2", 64, 64, 3, 1, 0),
       ("conv2_1", 128, 64, 3, 1, 0), ("conv2_2", 128, 128, 3, 1, 0),
       ("conv3_1", 256, 128, 3, 1, 0), ("conv3_2", 256, 256, 3, 1, 0),
       ("conv3_3", 256, 256, 3, 1, 0),
       ("conv4_1", 512, 256, 3, 1, 0), ("conv4_2", 512, 512, 3, 1, 0),
       ("conv4_3", 512, 512, 3, 1, 0),
       ("conv5_1", 512, 512, 3, 2, 0), ("conv5_2", 512, 512, 3, 2, 0),
       ("conv5_3", 512, 512, 3, 2, 0),
       ("fc6", 4096, 512, 7, 4, 0), ("fc7", 4096, 4096, 1, 1, 0)]


def urban(classes: int, dilations: list[tuple[str, int]]) -> list[tuple]:
    """The urban models' final layer and Basic context module: C channels, pad = dilation."""
    return [("final", classes, 4096, 1, 1, 0)] + [
        (f"ctx_{name}", classes, classes, 3, d, d) for name, d in dilations] + [
        ("ctx_final", classes, classes, 1, 1, 0)]


# input / output: the deploy net's input size and its (C, h, w) output before any upsampling;
# mean: the authors' BGR mean pixel (datasets/<name>.json; Cityscapes: REFERENCE sec. 3);
# largest_image: the largest image the dataset config evaluates.
PUBLISHED = {
    "dilation8_pascal_voc": dict(
        input=(900, 900), output=(21, 66, 66), mean=(102.93, 111.36, 116.52),
        largest_image=(500, 500), layers=VGG + [
            ("fc-final", 21, 4096, 1, 1, 0), ("ct_conv1_1", 42, 21, 3, 1, 33),
            ("ct_conv1_2", 42, 42, 3, 1, 0), ("ct_conv2_1", 84, 42, 3, 2, 0),
            ("ct_conv3_1", 168, 84, 3, 4, 0), ("ct_conv4_1", 336, 168, 3, 8, 0),
            ("ct_conv5_1", 672, 336, 3, 16, 0), ("ct_fc1", 672, 672, 3, 1, 0),
            ("ct_final", 21, 672, 1, 1, 0)]),
    "dilation8_camvid": dict(
        input=(900, 1100), output=(11, 66, 91),
        mean=(110.70313206, 108.77808759, 105.41212523), largest_image=(480, 640),
        layers=VGG + urban(11, [("conv1_1", 1), ("conv1_2", 1), ("conv2_1", 2), ("conv3_1", 4),
                                ("conv4_1", 8), ("conv5_1", 16), ("fc1", 1)])),
    "dilation7_kitti": dict(
        input=(852, 1640), output=(11, 60, 159),
        mean=(96.19429688, 95.55136972, 91.34692262), largest_image=(370, 1226),
        layers=VGG + urban(11, [("conv1_1", 1), ("conv1_2", 1), ("conv2_1", 2), ("conv3_1", 4),
                                ("conv4_1", 8), ("fc1", 1)])),
    "dilation10_cityscapes": dict(
        input=(1396, 1396), output=(19, 128, 128), upsampled=(1024, 1024),
        mean=(72.39, 82.91, 73.16), largest_image=(1024, 2048),
        layers=VGG + urban(19, [("conv1_1", 1), ("conv1_2", 1), ("conv2_1", 2), ("conv3_1", 4),
                                ("conv4_1", 8), ("conv5_1", 16), ("conv6_1", 32),
                                ("conv7_1", 64), ("fc1", 1)])),
}
DEPLOY_MARGIN = 186  # test.py's label_margin: the deploy input's reflect pad on every side


def readme_commands(model: str) -> list[list[str]]:
    """The arguments of each `dilatedseg validate` command in README.md that loads
    pretrained/<model>.caffemodel."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    commands = [shlex.split(line) for line in text.splitlines()
                if line.strip().startswith("dilatedseg validate")]
    return [words[2:] for words in commands
            if f"--model.init_from=pretrained/{model}.caffemodel" in words]


def build(arguments: list[str], device: str = "meta") -> SegmentationModule:
    """The module `dilatedseg validate <arguments>` builds (linked options from its data
    module), without reading the weights it names."""
    configs = [word for word in arguments if word != "--config"]
    return module_from_config(yaml.safe_load(print_config(*configs)), device)


def module_from_config(config: dict, device: str = "meta") -> SegmentationModule:
    """The module a resolved config (``--print_config``'s) builds, with the options the CLI
    links from its data module, without reading the weights it names."""
    data = import_class(config["data"]["class_path"])(**config["data"]["init_args"])
    options = {key: value for key, value in config["model"].items()
               if key not in ("class_names", "categories", "init_from", "pretrained")}
    options.update(num_classes=data.num_classes, pixel_mean=data.mean_rgb)
    with torch.device(device):
        return SegmentationModule(**options)


@pytest.fixture(scope="module")
def modules() -> dict[str, list[SegmentationModule]]:
    return {model: [build(arguments) for arguments in readme_commands(model)]
            for model in PUBLISHED}


def our_layers(segmenter: nn.Module) -> list[tuple]:
    """(out, in, kernel, dilation, pad, ReLU after it) of each convolution in network order;
    the context module's first pad includes its one pad before it (padding valid)."""
    rows = []
    for part in (list(segmenter.frontend.features) + [segmenter.frontend.final],
                 list(segmenter.context.layers)):
        for i, m in enumerate(part):
            if isinstance(m, nn.Conv2d):
                relu = i + 1 < len(part) and isinstance(part[i + 1], nn.ReLU)
                rows.append([m.out_channels, m.in_channels, *m.kernel_size, *m.dilation,
                             *m.padding, relu])
    first_context = rows[len(rows) - len(segmenter.context.convs())]
    first_context[6:8] = [pad + segmenter.context.margin for pad in first_context[6:8]]
    return [tuple(row) for row in rows]


@pytest.mark.parametrize("model", PUBLISHED)
def test_readme_command_builds_the_published_network(modules, model):
    published = PUBLISHED[model]
    expected = [(out, inp, k, k, d, d, pad, pad, not name.endswith("final"))
                for name, out, inp, k, d, pad in published["layers"]]
    assert modules[model], f"README.md has no command that loads {model}.caffemodel"
    for module in modules[model]:
        segmenter = module.model
        assert our_layers(segmenter) == expected
        assert segmenter.frontend.padding == "valid"
        assert segmenter.frontend.margin == DEPLOY_MARGIN
        # (meta-device buffers hold no values: the options the module was built with)
        assert list(module.hparams.pixel_std) == [1.0, 1.0, 1.0]
        bgr = module.hparams.pixel_mean[::-1]
        np.testing.assert_allclose(bgr, published["mean"], rtol=0, atol=0.01)
        # Their upsampling: interp_map (zoom 8) of the probabilities, or the deconvolution.
        assert segmenter.upsample == ("deconv" if "upsampled" in published else "zoom")
        # test.py's tiles (deploy input - 372 px, exact), each through the whole network; the
        # dataset's largest image needs no several tiles along an axis that cannot stitch.
        tile = module.hparams.tile_size
        assert list(tile) == [size - 2 * DEPLOY_MARGIN for size in published["input"]]
        assert module.hparams.tile_whole_network
        check_deploy_tiles(published["largest_image"], tile)


@pytest.mark.parametrize("model", PUBLISHED)
def test_deploy_input_gives_the_deploy_output(modules, model):
    """The bare network (the deploy input already carries its 186 px reflect pad)."""
    published = PUBLISHED[model]
    for module in modules[model]:
        segmenter = module.model
        frontend = segmenter.frontend
        with torch.no_grad():
            image = torch.empty(1, 3, *published["input"], device="meta")
            logits = segmenter.refine(frontend.final(frontend.features(image)))
            assert tuple(logits.shape[1:]) == published["output"]
            if "upsampled" in published:  # the deconvolution's own size, not cropped
                upsampled = segmenter.upsample_to(logits, (4096, 4096))
                assert tuple(upsampled.shape[-2:]) == published["upsampled"]
        # ceil-mode pooling: KITTI's 1640 - 372 = 1268 px wide tile gives 159 cells, not 158.5
        assert list(published["output"][1:]) == [
            -(-(size - 2 * DEPLOY_MARGIN) // 8) for size in published["input"]]


@pytest.mark.parametrize("model", PUBLISHED)
def test_evaluation_runs_the_deploy_input(modules, model):
    """What the command evaluates the dataset's largest image with: the front-end sees
    exactly the deploy input, once per test.py tile (Cityscapes: 1 x 2)."""
    published = PUBLISHED[model]
    height, width = published["largest_image"]
    seen = []
    for module in modules[model]:
        tile_h, tile_w = module.hparams.tile_size
        tiles = -(-height // tile_h) * -(-width // tile_w)
        seen.clear()
        hook = module.model.frontend.features.register_forward_hook(
            lambda layer, args, out: seen.append(tuple(args[0].shape[-2:])))
        with torch.no_grad():
            out = module.image_logits(torch.empty(1, 3, height, width, device="meta"))
        hook.remove()
        assert seen == [published["input"]] * tiles
        assert tuple(out.shape) == (1, published["output"][0], height, width)


def published_layers(model: str) -> list[CaffeLayer]:
    """Every layer of the published net as its .caffemodel holds it: the layers with weights
    (weights i + 1 and biases -(i + 1) for the i-th; conv1_1's input channels 1, 2, 3 in
    Caffe's BGR order), a ReLU after each but the classifiers, the Cityscapes deconvolution and
    the softmax. Weights are broadcast views: nothing VGG-sized is allocated here."""
    layers = []
    for i, (name, out, inp, kernel, dilation, pad) in enumerate(PUBLISHED[model]["layers"]):
        value = np.arange(1, 4, dtype=np.float32)[:, None, None] if name == "conv1_1" else \
            np.float32(i + 1)
        weight = np.broadcast_to(value, (out, inp, kernel, kernel))
        conv = {"pad": [pad], "dilation": [dilation]} if dilation > 1 else {"pad": [pad]}
        layers.append(CaffeLayer(name, "Convolution",
                                 [weight, np.full(out, -(i + 1), np.float32)], conv))
        if not name.endswith("final"):
            layers.append(CaffeLayer(name.replace("conv", "relu"), "ReLU", [], {}))
    if "upsampled" in PUBLISHED[model]:
        classes = PUBLISHED[model]["output"][0]
        layers.append(CaffeLayer("ctx_upsample", "Deconvolution", [caffe_bilinear(classes)],
                                 {"pad": [4]}))
    return layers + [CaffeLayer("prob", "Softmax", [], {})]


def assert_loaded(state: dict[str, torch.Tensor], segmenter: nn.Module) -> None:
    """``state`` fills every convolution of ``segmenter``, the i-th published layer's values
    in the i-th convolution, conv1_1 turned to RGB."""
    convs = [f"{prefix}.{name}" for prefix, m in segmenter.named_modules()
             if isinstance(m, nn.Conv2d) for name in ("weight", "bias")]
    assert sorted(state) == sorted(convs)
    for i, key in enumerate(convs[::2]):
        weight, bias = state[key], state[key.removesuffix("weight") + "bias"]
        assert weight.shape == segmenter.get_parameter(key).shape
        if i == 0:
            assert weight[0, :, 0, 0].tolist() == [3.0, 2.0, 1.0]
        else:
            assert bool((weight == i + 1).all()), f"{key} is not layer {i}'s weights"
        assert bool((bias == -(i + 1)).all())


@pytest.mark.parametrize("model", PUBLISHED)
def test_the_published_layers_fill_the_model(modules, model):
    for module in modules[model]:
        state = caffe_state_dict(published_layers(model), module.model, model)
        assert_loaded(state, module.model)
        del state
