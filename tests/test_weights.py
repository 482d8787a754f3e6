"""ImageNet VGG-16 weights: torchvision's names and shapes mapped onto the front-end."""

import pytest
import torch

from dilatedseg.models import FrontEnd, Segmenter
from dilatedseg.models.weights import WeightsError, load_vgg16_imagenet
from dilatedseg.module import SegmentationModule
from dilatedseg.runs import RunError

VGG16_FEATURES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)  # torchvision's conv indices


def vgg_convs(frontend: FrontEnd) -> list:
    """conv1_1 ... conv5_3 (not fc6 / fc7) in order."""
    return [m for name, m in frontend.features.named_children()
            if isinstance(m, torch.nn.Conv2d) and name.startswith("conv")]


def test_vgg16_names_and_fc_reshape():
    """A torchvision-format VGG-16 state dict (expanded constants: no 530 MB in memory)."""
    net = FrontEnd(21)
    final = net.final.weight.detach().clone()
    shapes = [conv.weight.shape for conv in vgg_convs(net)]
    state = {}
    for k, (index, shape) in enumerate(zip(VGG16_FEATURES, shapes)):
        state[f"features.{index}.weight"] = torch.tensor(float(k)).expand(shape)
        state[f"features.{index}.bias"] = torch.full((shape[0],), k + 0.5)
    # fc6 weight[o, j] = j: after reshaping, conv weight[o, c, y, x] must be c * 49 + y * 7 + x.
    state["classifier.0.weight"] = torch.arange(25088.0).expand(4096, 25088)
    state["classifier.0.bias"] = torch.full((4096,), -1.0)
    state["classifier.3.weight"] = torch.tensor(2.0).expand(4096, 4096)
    state["classifier.3.bias"] = torch.full((4096,), -2.0)
    state["classifier.6.weight"] = torch.zeros(1000, 4096)
    state["classifier.6.bias"] = torch.zeros(1000)

    loaded = load_vgg16_imagenet(net, state)
    assert len(loaded) == 15 and "final" not in loaded
    for k, conv in enumerate(vgg_convs(net)):
        assert conv.weight.min() == conv.weight.max() == k and conv.bias[0] == k + 0.5
    fc6 = net.features.fc6.weight
    assert fc6.shape == (4096, 512, 7, 7)
    c, y, x = 300, 4, 6
    assert fc6[17, c, y, x] == c * 49 + y * 7 + x and fc6[4095, 511, 6, 6] == 25087
    assert net.features.fc7.weight.shape == (4096, 4096, 1, 1)
    assert net.features.fc7.weight[5, 9, 0, 0] == 2.0 and net.features.fc7.bias[0] == -2.0
    assert torch.equal(net.final.weight, final)  # the classifier keeps its N(0, 1e-3) init


def torchvision_style(frontend: FrontEnd) -> dict:
    """A torchvision-format state dict (random values) shaped for ``frontend``."""
    torch.manual_seed(1)
    state, index = {}, 0
    for conv in vgg_convs(frontend):
        state[f"features.{index}.weight"] = torch.randn(conv.weight.shape)
        state[f"features.{index}.bias"] = torch.randn(conv.bias.shape)
        index += 3
    for key, name in (("classifier.0", "fc6"), ("classifier.3", "fc7")):
        weight = getattr(frontend.features, name).weight
        state[f"{key}.weight"] = torch.randn(weight.shape[0], weight[0].numel())
        state[f"{key}.bias"] = torch.randn(weight.shape[0])
    state["classifier.6.weight"] = torch.randn(10, state["classifier.3.weight"].shape[0])
    return state


def check_loaded(net: FrontEnd, state: dict) -> None:
    assert torch.equal(net.features.conv1_1.weight, state["features.0.weight"])
    assert torch.equal(net.features.conv5_1.weight, state["features.9.weight"])
    assert torch.equal(net.features.fc6.weight.flatten(1), state["classifier.0.weight"])
    assert torch.equal(net.features.fc7.bias, state["classifier.3.bias"])


def test_pretrained_from_file_and_url(tmp_path, monkeypatch):
    state = torchvision_style(FrontEnd(4, arch="tiny"))
    path = tmp_path / "vgg-tiny.pth"
    torch.save(state, path)
    check_loaded(FrontEnd(4, arch="tiny", pretrained=str(path)), state)
    # URLs go through torch.hub's download cache (file:// stands in for https:// here).
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    check_loaded(FrontEnd(4, arch="tiny", pretrained=path.as_uri()), state)
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "vgg-tiny.pth").is_file()


def test_unreachable_or_missing_weights_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsError, match=r"curl -LO .*--model.pretrained=/path/to/vgg16"):
        FrontEnd(4, arch="tiny", pretrained="http://127.0.0.1:9/vgg16-397923af.pth")
    with pytest.raises(WeightsError, match="do not exist"):
        FrontEnd(4, arch="tiny", pretrained=str(tmp_path / "nope.pth"))
    for name, content in (("text.pth", b"not weights"), ("empty.pth", b""),
                          ("cut.pth", b"PK\x03\x04cut short")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(WeightsError, match=f"{name} cannot be read"):
            FrontEnd(4, arch="tiny", pretrained=str(tmp_path / name))
    with pytest.raises(RunError, match="--model.pretrained"):  # the CLI prints it, no traceback
        SegmentationModule(4, arch="tiny", pretrained="http://127.0.0.1:9/vgg16-397923af.pth")


def test_wrong_state_dicts_are_rejected(tmp_path):
    tiny = FrontEnd(4, arch="tiny")
    with pytest.raises(WeightsError, match="torchvision's VGG"):
        load_vgg16_imagenet(tiny, {"conv1.weight": torch.zeros(1)})
    state = torchvision_style(tiny)
    state["features.3.weight"] = torch.zeros(8, 16, 3, 3)
    with pytest.raises(WeightsError, match="conv2_1"):
        load_vgg16_imagenet(tiny, state)
    weights_only = {k: v for k, v in torchvision_style(tiny).items() if k.endswith(".weight")}
    with pytest.raises(WeightsError, match="torchvision's VGG"):  # was a KeyError
        load_vgg16_imagenet(tiny, weights_only)


def test_default_normalisation_is_torchvisions():
    segmenter = Segmenter(FrontEnd(2, arch="tiny"))
    image = torch.rand(1, 3, 8, 8) * 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(segmenter.normalise(image), (image / 255 - mean) / std)


def test_init_from_replaces_imagenet_weights_so_they_are_not_read(tmp_path, monkeypatch):
    """Later stages (and evaluating their checkpoints) work offline without the VGG file."""
    fetched = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url",
                        lambda url, *args, **kwargs: fetched.append(url))
    module = SegmentationModule(4, arch="tiny", stage="context",
                                pretrained="http://127.0.0.1:9/vgg16-397923af.pth",
                                init_from=str(tmp_path / "frontend.ckpt"))
    assert fetched == []
    assert module.hparams.pretrained  # kept in the hyper-parameters, just not read


def test_a_context_module_that_does_not_fit_is_named(tmp_path):
    basic = SegmentationModule(4, arch="tiny", stage="context", dilations=[1, 2])
    torch.save({"state_dict": basic.state_dict()}, tmp_path / "basic.ckpt")  # no hparams
    large = SegmentationModule(4, arch="tiny", stage="joint", dilations=[1, 2],
                               context_variant="large")
    initial = {k: v.clone() for k, v in large.model.context.state_dict().items()}
    with pytest.warns(UserWarning, match=r"its context module does not fit this one .*"
                                         r"context_variant or dilations"):
        large.load_weights(str(tmp_path / "basic.ckpt"))
    torch.testing.assert_close(large.model.frontend.state_dict(),
                               basic.model.frontend.state_dict())
    # Taken whole or not at all: the layers whose shapes happen to agree are not loaded.
    torch.testing.assert_close(large.model.context.state_dict(), initial)


def test_a_schedule_of_the_same_depth_is_not_loaded_silently(tmp_path):
    """[1, 2] and [1, 4] have the same shapes: the checkpoint's hyperparameters tell them apart."""
    trained = SegmentationModule(4, arch="tiny", stage="context", dilations=[1, 2])
    torch.nn.init.normal_(trained.model.context.layers[0].weight)
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)},
               tmp_path / "context.ckpt")
    other = SegmentationModule(4, arch="tiny", stage="joint", dilations=[1, 4])
    initial = {k: v.clone() for k, v in other.model.context.state_dict().items()}
    with pytest.warns(UserWarning, match=r"dilations \(1, 2\) vs \(1, 4\)\): only the "
                                         r"front-end is loaded"):
        other.load_weights(str(tmp_path / "context.ckpt"))
    torch.testing.assert_close(other.model.context.state_dict(), initial)
    same = SegmentationModule(4, arch="tiny", stage="joint", dilations=[1, 2])
    same.load_weights(str(tmp_path / "context.ckpt"))  # fits: loaded whole, no warning
    torch.testing.assert_close(same.model.context.state_dict(),
                               trained.model.context.state_dict())


def test_evaluating_a_context_module_that_does_not_fit_is_an_error(tmp_path):
    """Training keeps the context module's initialisation (warned); evaluating with it would
    score an untrained module, so it stops."""
    trained = SegmentationModule(4, arch="tiny", stage="context", dilations=[1, 2])
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)},
               tmp_path / "context.ckpt")
    other = SegmentationModule(4, arch="tiny", stage="context", dilations=[1, 4])
    with pytest.raises(RunError, match=r"no weights that fit this model's context module "
                                       r"\(dilations \(1, 2\) vs \(1, 4\)\)"):
        other.load_weights(str(tmp_path / "context.ckpt"), evaluating=True)


def test_a_front_end_of_the_other_padding_is_not_loaded(tmp_path):
    trained = SegmentationModule(4, arch="tiny", padding="same")
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams)},
               tmp_path / "same.ckpt")
    valid = SegmentationModule(4, arch="tiny", padding="valid", stage="context")
    with pytest.raises(RunError, match="trained with padding=same, but this model has "
                                       "padding=valid: set --model.padding=same"):
        valid.load_weights(str(tmp_path / "same.ckpt"))


def test_legacy_format_checkpoints_load(tmp_path):
    """torch.save(..., _use_new_zipfile_serialization=False) files cannot be memory-mapped."""
    trained = SegmentationModule(4, arch="tiny", stage="context", dilations=[1, 2])
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "old.ckpt",
               _use_new_zipfile_serialization=False)
    fresh = SegmentationModule(4, arch="tiny", stage="joint", dilations=[1, 2])
    fresh.load_weights(str(tmp_path / "old.ckpt"))
    torch.testing.assert_close(fresh.model.state_dict(), trained.model.state_dict())
