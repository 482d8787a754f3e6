"""The authors' published Caffe models: .caffemodel files written by the real protobuf library
(from BVLC caffe.proto's field numbers) load into a Segmenter exactly; "zoom" upsampling is
their interp_map."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from dilatedseg.models import ContextModule, FrontEnd, Segmenter
from dilatedseg.models.caffemodel import load_caffemodel, read_caffemodel
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
    ("LayerParameter", [("name", 1, F.TYPE_STRING, F.LABEL_OPTIONAL, None, False),
                        ("type", 2, F.TYPE_STRING, F.LABEL_OPTIONAL, None, False),
                        ("blobs", 7, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".caffe.BlobProto",
                         False)]),
    ("V1LayerParameter", [("name", 4, F.TYPE_STRING, F.LABEL_OPTIONAL, None, False),
                          ("type", 5, F.TYPE_INT32, F.LABEL_OPTIONAL, None, False),
                          ("blobs", 6, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".caffe.BlobProto",
                           False)]),
    ("NetParameter", [("name", 1, F.TYPE_STRING, F.LABEL_OPTIONAL, None, False),
                      ("layers", 2, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".caffe.V1LayerParameter",
                       False),
                      ("layer", 100, F.TYPE_MESSAGE, F.LABEL_REPEATED, ".caffe.LayerParameter",
                       False)]),
]


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


def authors_layers(segmenter: Segmenter, prefix: str = "ctx") -> list[tuple[str, list]]:
    """The Segmenter's weights as the authors' network holds them: their layer names, BGR
    conv1_1, the context module's ctx_* layers and its frozen upsampling deconvolution."""
    frontend = segmenter.frontend
    layers = [(name, [m.weight, m.bias]) for name, m in frontend.features.named_children()
              if isinstance(m, torch.nn.Conv2d)]
    layers[0] = ("conv1_1", [frontend.features.conv1_1.weight.flip(1),
                             frontend.features.conv1_1.bias])
    layers.append(("fc-final", [frontend.final.weight, frontend.final.bias]))
    convs = [m for m in segmenter.context.layers if isinstance(m, torch.nn.Conv2d)]
    names = [f"{prefix}_conv{i + 1}_1" for i in range(len(convs) - 2)] + [f"{prefix}_fc1",
                                                                          f"{prefix}_final"]
    layers += [(name, [m.weight, m.bias]) for name, m in zip(names, convs)]
    return layers


def write_caffemodel(path, layers, legacy: bool = False, deconv: int | None = None) -> None:
    net = net_class()(name="dilation")
    for name, blobs in layers:
        layer = net.layers.add(name=name, type=4) if legacy else net.layer.add(
            name=name, type="Convolution")
        for tensor in blobs:
            blob = layer.blobs.add()
            values = tensor.detach().numpy()
            if legacy:  # the pre-2015 num / channels / height / width form
                blob.num, blob.channels, blob.height, blob.width = (1,) * (
                    4 - values.ndim) + values.shape
            else:
                blob.shape.dim.extend(values.shape)
            blob.data.extend(values.ravel().tolist())
    if deconv is not None:  # Cityscapes: ctx_upsample, frozen bilinear, no bias
        layer = net.layer.add(name="ctx_upsample", type="Deconvolution")
        blob = layer.blobs.add()
        blob.shape.dim.extend([deconv, 1, 16, 16])
        blob.data.extend([0.25] * (deconv * 256))
    path.write_bytes(net.SerializeToString())


def small_segmenter(seed: int, **context) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter(FrontEnd(5, arch="tiny"), ContextModule(5, dilations=[1, 2, 4], **context),
                     pixel_std=(1.0, 1.0, 1.0))


@pytest.mark.parametrize("legacy", [False, True])
def test_published_layout_loads_exactly(tmp_path, legacy):
    source, target = small_segmenter(0, init="random"), small_segmenter(1)
    write_caffemodel(tmp_path / "model.caffemodel", authors_layers(source), legacy=legacy,
                     deconv=None if legacy else 5)
    names = [name for name, _, _ in read_caffemodel(tmp_path / "model.caffemodel")]
    assert names[0] == "conv1_1" and names[-1] == ("ctx_final" if legacy else "ctx_upsample")
    load_caffemodel(target, tmp_path / "model.caffemodel")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)
    image = torch.rand(1, 3, 40, 48) * 255
    with torch.no_grad():
        torch.testing.assert_close(target.eval()(image), source.eval()(image))


def test_a_model_that_does_not_fit_is_named(tmp_path):
    path = tmp_path / "voc.caffemodel"
    write_caffemodel(path, authors_layers(small_segmenter(0), prefix="ct"))
    with pytest.raises(WeightsError, match=r"has 11 layers with weights .*ct_final\), this model "
                                           r"10: match its context module"):
        load_caffemodel(Segmenter(FrontEnd(5, arch="tiny"), ContextModule(5, dilations=[1, 2])),
                        path)
    with pytest.raises(WeightsError, match=r"layer fc-final has weights of shape \[5, \d+, 1, 1\]"
                                           r", this model's frontend.final \[6, "):
        load_caffemodel(Segmenter(FrontEnd(6, arch="tiny"),
                                  ContextModule(6, dilations=[1, 2, 4])), path)
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
