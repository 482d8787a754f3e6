"""Front-end geometry: the authors' valid + reflect-pad layout, sizes, alignment at stride 8."""

import numpy as np
import pytest
import torch
from torch import nn

from dilatedseg.models import FrontEnd
from dilatedseg.models.frontend import receptive_field, reflect_pad, valid_shrinkage


def test_vgg16_parameters_and_published_geometry():
    # Shapes only: the meta device runs torch's own shape rules without the ~250 GFLOPs.
    with torch.device("meta"):
        net = FrontEnd(21)
        params = sum(p.numel() for p in net.parameters())
        bare = net.final(net.features(torch.empty(1, 3, 900, 900)))
        padded = net(torch.empty(1, 3, 512, 512))
        camvid = net.final(net.features(torch.empty(1, 3, 900, 1100)))
        kitti = net.final(net.features(torch.empty(1, 3, 852, 1640)))
        cityscapes = net.final(net.features(torch.empty(1, 3, 1396, 1396)))
    assert params == 134_346_581 and round(params / 1e6, 2) == 134.35
    assert bare.shape[-2:] == (66, 66)
    assert padded.shape[-2:] == (64, 64)
    assert camvid.shape[-2:] == (66, 91) and kitti.shape[-2:] == (60, 159)
    assert cityscapes.shape[-2:] == (128, 128)
    assert receptive_field("vgg16") == 380 and valid_shrinkage("vgg16") == 372
    assert net.margin == 186
    pools = [m for m in net.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(p.ceil_mode for p in pools)
    assert not isinstance(list(net.features)[-1], nn.Conv2d)
    assert net.features.fc6.dilation == (4, 4) and net.features.conv5_1.dilation == (2, 2)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("size", [(1, 1), (7, 13), (33, 64), (70, 41)])
def test_any_input_size_gives_ceil_h8(padding, size):
    net = FrontEnd(3, arch="tiny", padding=padding).eval()
    with torch.no_grad():
        net.final.bias.fill_(-1.0)
        out = net(torch.randn(2, 3, *size))
    assert out.shape == (2, 3, -(-size[0] // 8), -(-size[1] // 8))
    assert (out < 0).all()  # no ReLU after the classifier


def test_dropout_after_fc6_and_fc7_only_in_training():
    """VGG-16's dropout layers (p = dropout) after fc6 and fc7, active in training only."""
    torch.manual_seed(0)
    net = FrontEnd(3, arch="tiny", padding="same", dropout=0.5)
    names = [name for name, _ in net.features.named_children()]
    drops = [(name, m.p) for name, m in net.features.named_children()
             if isinstance(m, nn.Dropout)]
    assert drops == [("fc6_drop", 0.5), ("fc7_drop", 0.5)]
    assert names.index("fc6_drop") == names.index("fc6_relu") + 1
    assert names.index("fc7_drop") == names.index("fc7_relu") + 1 == len(names) - 1
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert not torch.equal(net.train()(image), net(image))  # random masks
        assert torch.equal(net.eval()(image), net(image))
    assert not any(isinstance(m, nn.Dropout) for m in FrontEnd(3, arch="tiny", dropout=0.0)
                   .features.children())


def test_final_layer_init():
    net = FrontEnd(5, arch="tiny")
    assert abs(net.final.weight.std().item() - 1e-3) < 3e-4
    assert torch.count_nonzero(net.final.bias) == 0


def test_reflect_pad_matches_numpy_beyond_image_size():
    x = torch.randn(1, 2, 5, 7)
    for pad in [(186, 193, 186, 190), (3, 0, 9, 1)]:
        ours = reflect_pad(x, pad).numpy()
        ref = np.pad(x.numpy(), ((0, 0), (0, 0), pad[2:], pad[:2]), mode="reflect")
        assert np.array_equal(ours, ref)


def receptive_box(net: FrontEnd, size: int, cell: tuple[int, int]) -> tuple[int, ...]:
    """Input rows / cols that influence one logit, measured by gradients. Max pools become
    average pools of the same geometry and weights positive, so every path carries gradient."""
    for name, module in net.features.named_children():
        if isinstance(module, nn.MaxPool2d):
            setattr(net.features, name, nn.AvgPool2d(2, 2, ceil_mode=True))
    with torch.no_grad():
        for conv in [*net.features.children(), net.final]:
            if isinstance(conv, nn.Conv2d):
                conv.weight.fill_(1.0 / conv.weight[0].numel())
                conv.bias.zero_()
    image = torch.ones(1, 3, size, size, requires_grad=True)
    net(image)[0, 0, cell[0], cell[1]].backward()
    rows = torch.nonzero(image.grad[0].abs().sum((0, 2))).flatten()
    cols = torch.nonzero(image.grad[0].abs().sum((0, 1))).flatten()
    return rows.min().item(), rows.max().item(), cols.min().item(), cols.max().item()


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_logit_centred_on_pixel_8i_plus_3_5(padding):
    net = FrontEnd(1, arch="tiny", padding=padding, dropout=0.0).eval()
    field = receptive_field("tiny")  # 54
    top, bottom, left, right = receptive_box(net, 96, (5, 6))
    assert (bottom - top + 1, right - left + 1) == (field, field)
    assert ((top + bottom) / 2, (left + right) / 2) == (8 * 5 + 3.5, 8 * 6 + 3.5)


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_shift_by_8_pixels_shifts_logits_by_one_cell(padding):
    torch.manual_seed(0)
    net = FrontEnd(4, arch="tiny", padding=padding, dropout=0.0).eval()
    image = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        base = net(image)
        shifted = net(torch.roll(image, shifts=(8, 16), dims=(2, 3)))
    # cells far enough from the borders for the 54 px receptive field
    torch.testing.assert_close(shifted[..., 6:14, 7:14], base[..., 5:13, 5:12])


@pytest.mark.parametrize("corner", [(0, 0), (16, 24), (40, 56)])
def test_crop_with_context_margin_predicts_what_the_whole_image_predicts(corner):
    """Training on the authors' crops (labelled crop + margin of real context) computes
    exactly the logits that whole-image inference gives those pixels, at the image border
    (mirrored context) and inside it."""
    torch.manual_seed(0)
    net = FrontEnd(4, arch="tiny", padding="valid", dropout=0.0).eval()
    m = net.margin  # 23 for the tiny front-end
    image = torch.randn(2, 3, 88, 120)
    top, left = corner
    crop = (32, 64)
    padded = reflect_pad(image, (m, m, m, m))  # what whole-image inference pads
    with_context = padded[..., top: top + crop[0] + 2 * m, left: left + crop[1] + 2 * m]
    with torch.no_grad():
        whole = net(image)
        from_crop = net(with_context, context_included=True)
        mirrored_crop = net(image[..., top: top + crop[0], left: left + crop[1]])
    assert from_crop.shape[-2:] == (crop[0] // 8, crop[1] // 8)
    cells = whole[..., top // 8: (top + crop[0]) // 8, left // 8: (left + crop[1]) // 8]
    torch.testing.assert_close(from_crop, cells)
    # Padding the bare crop instead (no real context) gives other logits at its edges.
    assert not torch.allclose(mirrored_crop, cells, atol=1e-3)


def test_context_included_needs_valid_geometry():
    net = FrontEnd(3, arch="tiny", padding="same")
    with pytest.raises(ValueError, match="same"):
        net(torch.zeros(1, 3, 64, 64), context_included=True)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="arch"):
        FrontEnd(3, arch="resnet")
    with pytest.raises(ValueError, match="padding"):
        FrontEnd(3, padding="reflect")
