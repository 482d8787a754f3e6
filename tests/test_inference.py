"""Tiled inference equals whole-image inference, in both geometries, with and without context."""

from __future__ import annotations

import pytest
import torch

from dilatedseg.inference import predict_logits, predict_probabilities
from dilatedseg.models import ContextModule, FrontEnd, Segmenter
from dilatedseg.module import SegmentationModule


def segmenter(padding: str, context: bool, upsample: str = "bilinear") -> Segmenter:
    torch.manual_seed(0)
    frontend = FrontEnd(5, arch="tiny", padding=padding, dropout=0.0)
    for param in frontend.parameters():  # weights large enough that tile seams would show
        torch.nn.init.normal_(param, std=0.2)
    module = ContextModule(5, dilations=[1, 2, 4, 1]) if context else None
    return Segmenter(frontend, module, upsample=upsample).eval()


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("context", [False, True])
def test_tiled_equals_whole_image(padding, context):
    model = segmenter(padding, context, upsample="deconv" if context else "bilinear")
    image = torch.rand(2, 3, 61, 83) * 255
    with torch.no_grad():
        whole = model(image)
        scale = whole.abs().max()
        for tile in [(16, 24), (40, 32), 33]:
            tiled = predict_logits(model, image, tile)
            assert tiled.shape == whole.shape
            torch.testing.assert_close(tiled / scale, whole / scale, atol=1e-4, rtol=0)
        assert predict_logits(model, image, (200, 200)).equal(whole)  # one tile: whole path
        probs = predict_probabilities(model, image, (16, 16))
        torch.testing.assert_close(probs.sum(1), torch.ones(2, 61, 83))


def test_uint8_images_as_batches_carry_them_give_the_float_result():
    model = segmenter("valid", context=True)
    image = torch.randint(0, 256, (1, 3, 40, 56), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(predict_logits(model, image, (16, 24)),
                                   predict_logits(model, image.float(), (16, 24)))


def test_too_small_margin_would_show_seams():
    """The test above can fail: tiles without the receptive-field margin differ."""
    model = segmenter("same", False)
    image = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        whole = model.frontend(model.normalise(image))
        left = model.frontend(model.normalise(image[..., :32]))
    assert not torch.allclose(left[..., -1], whole[..., 3], atol=1e-3)


def test_module_evaluates_with_tiles():
    module = SegmentationModule(4, arch="tiny", padding="valid", stage="context",
                                dilations=[1, 2, 1], tile_size=(16, 16)).eval()
    image = torch.rand(1, 3, 40, 56) * 255
    batch = {"image": image, "label": torch.zeros(1, 40, 56, dtype=torch.long), "name": ["a"]}
    with torch.no_grad():
        out = module.predict_step(batch, 0)
        assert out["prediction"].shape == (1, 40, 56)
        assert out["prediction"].equal(module(image).argmax(1).to(torch.uint8))


def test_upsampling_modes_interpolate_logits_or_the_authors_probabilities():
    """bilinear: the logits, trained and evaluated alike; zoom (the authors' VOC / CamVid /
    KITTI models): softmax at 1/8, then the probabilities, whole or tiled."""
    model = segmenter("same", context=True)
    image = torch.rand(1, 3, 61, 83) * 255
    with torch.no_grad():
        coarse = model.coarse_logits(image)
        bilinear = torch.nn.functional.interpolate(
            coarse, scale_factor=8, mode="bilinear", align_corners=False)[..., :61, :83]
        torch.testing.assert_close(model(image), bilinear)
        torch.testing.assert_close(predict_logits(model, image, (16, 24)), bilinear,
                                   atol=1e-3, rtol=1e-4)  # (other convolution shapes)
        model.upsample = "zoom"
        padded = torch.nn.functional.pad(coarse.softmax(1), (0, 1, 0, 1), mode="replicate")
        zoom = torch.nn.functional.interpolate(padded, size=(8 * 8 + 1, 8 * 11 + 1),
                                               mode="bilinear", align_corners=True)
        torch.testing.assert_close(predict_probabilities(model, image), zoom[..., :61, :83])
        torch.testing.assert_close(predict_probabilities(model, image, (16, 24)),
                                   zoom[..., :61, :83], atol=1e-4, rtol=1e-4)
