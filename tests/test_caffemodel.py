"""The authors' published Caffe models: .caffemodel files written by the real protobuf library
(from BVLC caffe.proto's field numbers) load into a Segmenter exactly; "zoom" upsampling is
their interp_map. tests/test_published_models.py checks the four published networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from dilatedseg.models import ContextModule, FrontEnd, Segmenter
from dilatedseg.models.caffemodel import context_layer_names, load_caffemodel, read_caffemodel
from dilatedseg.models.weights import WeightsError
from dilatedseg.module import SegmentationModule
from dilatedseg.runs import RunError

F = descriptor_pb2.FieldDescriptorProto
# The part of caffe.proto a .caffemodel's weights use: (message, [(field, number, type, label,
# message type, packed)]).
CAFFE_PROTO = [
    ("BlobShape", [("dim", 1, F.TYPE_INT64, F.LABEL_REPEATED, None, True)]),
    ("BlobProto", [("shape", 7, F.TYPE_MESSAGE, F.LABEL_OPTIONAL, ".caffe.BlobShape", False),
                   ("data", 5, F.TYPE_FLOAT, F.LABEL_REPEATED, None, True),
                   ("num", 1, F.TYPE_INT32, F.LABEL_OPTIONAL, None, False),
                   ("channels", 2, F.TYPE_INT32, F.LABEL_OPTIONAL, None, False),
                   ("height", 3, F.TYPE_INT32, F.LABEL_OPTIONAL, None, False),
                   ("width", 4, F.TYPE_INT32, F.LABEL_OPTIONAL, None, False)]),
    ("ConvolutionParameter", [("num_output", 1, F.TYPE_UINT32, F.LABEL_OPTIONAL, None, False),
                              ("pad", 3, F.TYPE_UINT32, F.LABEL_REPEATED, None, False),
                              ("kernel_size", 4, F.TYPE_UINT32, F.LABEL_REPEATED, None, False),
                              ("dilation", 18, F.TYPE_UINT32, F.LABEL_REPEATED, None, False)]),
    ("LayerParameter", [("name", 1, F.TYPE_STRING, F.LABEL_OPTIONAL, None, False),
                        ("type", 2, F.TYPE_STRING, F.LABEL_OPTIONAL, None, False),
                        ("blobs", 7, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".caffe.BlobProto",
                         False),
                        ("convolution_param", 106, F.TYPE_MESSAGE, F.LABEL_OPTIONAL,
                         ".caffe.ConvolutionParameter", False)]),
    ("V1LayerParameter", [("name", 4, F.TYPE_STRING, F.LABEL_OPTIONAL, None, False),
                          ("type", 5, F.TYPE_INT32, F.LABEL_OPTIONAL, None, False),
                          ("blobs", 6, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".caffe.BlobProto",
                           False),
                          ("convolution_param", 10, F.TYPE_MESSAGE, F.LABEL_OPTIONAL,
                           ".caffe.ConvolutionParameter", False)]),
    ("NetParameter", [("name", 1, F.TYPE_STRING, F.LABEL_OPTIONAL, None, False),
                      ("layers", 2, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".caffe.V1LayerParameter",
                       False),
                      ("layer", 100, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".caffe.LayerParameter",
                       False)]),
]
V1_TYPES = {"Convolution": 4, "Deconvolution": 39, "ReLU": 18, "Softmax": 20}  # LayerType


def net_class():
    proto = descriptor_pb2.FileDescriptorProto(name="caffe_weights.proto", package="caffe",
                                               syntax="proto2")
    for message, fields in CAFFE_PROTO:
        descriptor = proto.message_type.add(name=message)
        for name, number, kind, label, type_name, packed in fields:
            field = descriptor.field.add(name=name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = type_name
            if packed:
                field.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe.NetParameter"))


def caffe_bilinear(channels: int, size: int = 16) -> np.ndarray:
    """Caffe's bilinear filler (BVLC filler.hpp) for a grouped (channels, 1, size, size)
    deconvolution: f = ceil(size / 2), c = (2f - 1 - f % 2) / 2f,
    w(x, y) = (1 - |x / f - c|) (1 - |y / f - c|)."""
    f = math.ceil(size / 2)
    c = (2 * f - 1 - f % 2) / (2 * f)
    ramp = 1 - np.abs(np.arange(size) / f - c)
    return np.broadcast_to(np.outer(ramp, ramp), (channels, 1, size, size)).astype(np.float32)


def authors_layers(segmenter: Segmenter, prefix: str = "ctx") -> list[tuple]:
    """The Segmenter as the authors' .caffemodel holds it: (name, type, blobs, convolution
    parameters) of every layer, ReLUs included: their layer names (``prefix`` "ct": the VOC
    model's ct_* and fc-final), BGR conv1_1, the pads and dilations, the frozen upsampling
    deconvolution for upsample="deconv"."""
    frontend, context = segmenter.frontend, segmenter.context
    convs = [(name, m, m.padding[0]) for name, m in frontend.features.named_children()
             if isinstance(m, torch.nn.Conv2d)]
    convs.append(("fc-final" if prefix == "ct" else "final", frontend.final, 0))
    context_convs = context.convs() if context is not None else []
    for i, (name, m) in enumerate(zip(context_layer_names(len(context_convs) - 1),
                                      context_convs)):
        convs.append((f"{prefix}_{name}", m, m.padding[0] + (context.margin if i == 0 else 0)))
    layers = []
    for name, m, pad in convs:
        weight = m.weight.flip(1) if name == "conv1_1" else m.weight
        layers.append((name, "Convolution", [weight, m.bias],
                       {"pad": [pad], "dilation": [m.dilation[0]]}))
        if not name.endswith("final"):
            layers.append((f"{name}_relu", "ReLU", [], {}))
    if segmenter.upsample == "deconv":
        kernel = caffe_bilinear(frontend.final.out_channels)
        layers.append(("ctx_upsample", "Deconvolution", [kernel], {"pad": [4]}))
    return layers + [("prob", "Softmax", [], {})]


def write_caffemodel(path, layers, legacy: bool = False) -> None:
    """``layers``: (name, type, blobs, convolution parameters) as :func:`authors_layers`;
    ``legacy``: the pre-2015 V1 layers with num / channels / height / width blobs."""
    net = net_class()(name="dilation")
    for name, kind, blobs, conv in layers:
        layer = net.layers.add(name=name, type=V1_TYPES[kind]) if legacy else net.layer.add(
            name=name, type=kind)
        if conv:
            layer.convolution_param.pad.extend(conv.get("pad", []))
            layer.convolution_param.dilation.extend(conv.get("dilation", []))
        for tensor in blobs:
            blob = layer.blobs.add()
            values = tensor.detach().numpy() if torch.is_tensor(tensor) else tensor
            if legacy:
                blob.num, blob.channels, blob.height, blob.width = (1,) * (
                    4 - values.ndim) + values.shape
            else:
                blob.shape.dim.extend(values.shape)
            blob.data.extend(values.ravel().tolist())
    path.write_bytes(net.SerializeToString())


def small_segmenter(seed: int, upsample: str = "bilinear", frontend_padding: str = "valid",
                    **context) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter(FrontEnd(5, arch="tiny", padding=frontend_padding),
                     ContextModule(5, dilations=context.pop("dilations", [1, 2, 4]), **context),
                     upsample=upsample, pixel_std=(1.0, 1.0, 1.0))


def assert_same_weights(target: torch.nn.Module, source: torch.nn.Module) -> None:
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("legacy", [False, True])
def test_published_layout_loads_exactly(tmp_path, legacy):
    source = small_segmenter(0, upsample="deconv", init="random")
    target = small_segmenter(1, upsample="deconv")
    write_caffemodel(tmp_path / "model.caffemodel", authors_layers(source), legacy=legacy)
    layers = read_caffemodel(tmp_path / "model.caffemodel")
    assert [layer.name for layer in layers][:2] == ["conv1_1", "conv1_1_relu"]
    assert [(layer.name, layer.kind) for layer in layers][-3:] == [
        ("ctx_final", "4" if legacy else "Convolution"), ("ctx_upsample", "Deconvolution"),
        ("prob", "20" if legacy else "Softmax")]
    assert layers[-5].name == "ctx_fc1" and layers[-5].conv == {"pad": [4], "dilation": [4]}
    load_caffemodel(target, tmp_path / "model.caffemodel")
    assert_same_weights(target, source)
    image = torch.rand(1, 3, 40, 48) * 255
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(image), source.eval()(image))


def test_layers_are_found_by_name_in_any_order(tmp_path):
    """As Caffe copies trained weights: by layer name, whatever the file's order."""
    source, target = small_segmenter(0, init="random"), small_segmenter(1)
    layers = authors_layers(source, prefix="ct")
    order = np.random.default_rng(0).permutation(len(layers))
    write_caffemodel(tmp_path / "model.caffemodel", [layers[i] for i in order])
    load_caffemodel(target, tmp_path / "model.caffemodel")
    assert_same_weights(target, source)


@pytest.mark.parametrize("model, error", [
    (lambda: small_segmenter(0, dilations=[1, 4]),
     r"has layers with weights this model lacks \(ct_conv1_2\): match its context module"),
    (lambda: small_segmenter(0, dilations=[1, 2, 2, 4]),
     r"has no layer ctx_conv2_1 or ct_conv2_1 for this model's context.layers.4 \(its layers "
     r"with weights: conv1_1, .*ct_final\): match its context module"),
    (lambda: Segmenter(FrontEnd(6, arch="tiny"), ContextModule(6, dilations=[1, 2, 4])),
     r"layer fc-final has weights of shape \[5, \d+, 1, 1\], this model's frontend.final \[6, "),
    (lambda: small_segmenter(0, dilations=[1, 3, 4]),  # same shapes, another schedule
     r"layer ct_conv1_2 has dilation 2, this model's context.layers.2 3: set --model.dilations"),
    (lambda: small_segmenter(0, frontend_padding="same"),  # same shapes, padded front-end
     r"layer conv1_1 has pad 0, this model's frontend.features.conv1_1 1: set "
     r"--model.padding=valid"),
    (lambda: small_segmenter(0, padding="valid"),  # same shapes, one pad before the module
     r"layer ct_conv1_1 has pad 1, this model's context.layers.0 7: set "
     r"--model.context_padding=same"),
])
def test_a_model_that_does_not_fit_is_named(tmp_path, model, error):
    path = tmp_path / "voc.caffemodel"
    write_caffemodel(path, authors_layers(small_segmenter(0), prefix="ct"))
    with pytest.raises(WeightsError, match=error):
        load_caffemodel(model(), path)


def test_an_upsampling_that_is_not_bilinear_or_a_cut_file_is_named(tmp_path):
    path = tmp_path / "cityscapes.caffemodel"
    layers = authors_layers(small_segmenter(0, upsample="deconv"))
    layers = [(name, kind, [np.full((5, 1, 16, 16), 0.25, np.float32)], conv)
              if kind == "Deconvolution" else (name, kind, blobs, conv)
              for name, kind, blobs, conv in layers]
    write_caffemodel(path, layers)
    with pytest.raises(WeightsError, match=r"layer ctx_upsample \(\[5, 1, 16, 16\]\) is not the "
                                           "fixed bilinear x8 upsampling"):
        load_caffemodel(small_segmenter(1, upsample="deconv"), path)
    (tmp_path / "cut.caffemodel").write_bytes(path.read_bytes()[:5000])
    with pytest.raises(WeightsError, match="cannot read Caffe model .*cut short"):
        read_caffemodel(tmp_path / "cut.caffemodel")


def test_module_loads_it_as_init_from_and_asks_for_unscaled_input(tmp_path):
    path = tmp_path / "model.caffemodel"
    source = small_segmenter(0, init="random")
    write_caffemodel(path, authors_layers(source))
    module = SegmentationModule(5, stage="context", arch="tiny", dilations=[1, 2, 4],
                                init_from=str(path))
    with pytest.raises(RunError, match=r"set --model.pixel_std=\[1,1,1\]"):
        module.load_initial_weights()
    module = SegmentationModule(5, stage="context", arch="tiny", dilations=[1, 2, 4],
                                init_from=str(path), pixel_std=(1.0, 1.0, 1.0))
    module.load_initial_weights()
    torch.testing.assert_close(module.model.context.state_dict(), source.context.state_dict())


def interp_map(prob: np.ndarray, zoom: int, width: int, height: int) -> np.ndarray:
    """The authors' upsampling (fyu/dilation predict.py), on a map with one more row and
    column than the image needs, as their network's output has."""
    out = np.zeros((prob.shape[0], height, width), np.float32)
    for h in range(height):
        for w in range(width):
            r0, c0 = h // zoom, w // zoom
            rt, ct = h / zoom - r0, w / zoom - c0
            v0 = rt * prob[:, r0 + 1, c0] + (1 - rt) * prob[:, r0, c0]
            v1 = rt * prob[:, r0 + 1, c0 + 1] + (1 - rt) * prob[:, r0, c0 + 1]
            out[:, h, w] = (1 - ct) * v0 + ct * v1
    return out


def test_zoom_upsampling_is_the_authors_interp_map():
    """Their predict.py: softmax, then interp_map of the probabilities (feature i on pixel 8i);
    zoom returns the log of those, so its softmax gives them back."""
    segmenter = Segmenter(FrontEnd(3, arch="tiny"), upsample="zoom")
    logits = torch.randn(1, 3, 5, 7) * 4
    height, width = 37, 50  # ceil(37 / 8) = 5, ceil(50 / 8) = 7
    edge = np.pad(logits[0].numpy(), ((0, 0), (0, 1), (0, 1)), mode="edge")
    authors = interp_map(torch.softmax(torch.from_numpy(edge), 0).numpy(), 8, width, height)
    for mode in (segmenter.train(), segmenter.eval()):  # one behaviour, training or not
        ours = mode.upsample_to(logits, (height, width)).softmax(1)[0].numpy()
        np.testing.assert_allclose(ours, authors, atol=1e-5)
    assert np.allclose(ours[:, ::8, ::8], logits[0].softmax(0).numpy(), atol=1e-6)
    # Interpolating the logits instead changes the argmax of some pixels between features.
    assert (authors.argmax(0) != interp_map(edge, 8, width, height).argmax(0)).any()


def test_zoom_keeps_the_gradient_of_a_class_far_below_the_winner():
    """exp(-120) underflows float32: the interpolation runs in log space instead."""
    segmenter = Segmenter(FrontEnd(3, arch="tiny"), upsample="zoom")
    logits = torch.zeros(1, 3, 2, 2)
    logits[:, 0] = 120.0
    logits.requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(segmenter.upsample_to(logits, (12, 12)),
                                             torch.ones(1, 12, 12, dtype=torch.long))
    loss.backward()
    assert loss.item() == pytest.approx(120.0, rel=1e-5)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().max() > 1e-3


def test_validate_a_published_model_through_the_cli(tiny_shapes, tmp_path):
    """`dilatedseg validate ... --model.init_from=X.caffemodel --model.pixel_std=[1,1,1]`
    evaluates exactly the weights in the file (no checkpoint, no ImageNet weights)."""
    import lightning as L
    from conftest import REPO, run_cli, shapes_args
    from fixtures_datasets import logged_metrics

    from dilatedseg.data import ShapesDataModule

    torch.manual_seed(0)
    module = SegmentationModule(4, stage="context", arch="tiny", padding="same",
                                dilations=[1, 1, 2, 4, 8, 1], context_init="random",
                                pixel_mean=ShapesDataModule.mean_rgb, pixel_std=(1.0, 1.0, 1.0))
    path = tmp_path / "shapes.caffemodel"
    write_caffemodel(path, authors_layers(module.model))
    data = ShapesDataModule(root=str(tiny_shapes), train_size=32, val_size=8, test_size=8,
                            num_workers=0, val_batch_size=4)
    expected = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False
                         ).validate(module, datamodule=data)[0]["val/mIoU"]
    runs = tmp_path / "runs"
    run_cli("validate", *shapes_args(tiny_shapes, runs, "--config",
                                     str(REPO / "conf/stage/context.yaml"),
                                     f"--model.init_from={path}", "--model.pixel_std=[1,1,1]",
                                     "--model.pretrained=http://127.0.0.1:9/never-fetched.pth"))
    logged = logged_metrics(runs / "shapes" / "context" / "validate_0")
    assert logged["val/mIoU"] == pytest.approx(expected, abs=1e-4)


def test_damaged_files_give_one_clear_error(tmp_path):
    """Random byte damage: the reader returns layers or raises WeightsError, nothing else."""
    path = tmp_path / "model.caffemodel"
    write_caffemodel(path, authors_layers(small_segmenter(0)))
    good = path.read_bytes()
    rng = np.random.default_rng(0)
    outcomes = []
    for trial in range(300):
        damaged = bytearray(good[:4000] if trial % 2 else good)
        for position in rng.integers(0, len(damaged), size=3):
            damaged[position] = int(rng.integers(0, 256))
        path.write_bytes(bytes(damaged))
        try:
            layers = read_caffemodel(path)
        except WeightsError as error:
            outcomes.append("error")
            assert str(path) in str(error)  # names the file
        else:
            outcomes.append("read")
            assert isinstance(layers, list)
    assert outcomes.count("error") >= 150  # every truncated file at least


def test_a_front_end_alone_takes_the_files_leading_layers(tmp_path):
    source = small_segmenter(0)
    write_caffemodel(tmp_path / "model.caffemodel", authors_layers(source))
    frontend_only = Segmenter(FrontEnd(5, arch="tiny"))
    load_caffemodel(frontend_only, tmp_path / "model.caffemodel")
    torch.testing.assert_close(frontend_only.frontend.state_dict(), source.frontend.state_dict())
