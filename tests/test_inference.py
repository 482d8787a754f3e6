"""Tiled inference equals whole-image inference, in both geometries, with and without context;
with ``tile_whole_network`` every tile runs the whole network on its own, as the authors'
test.py."""

from __future__ import annotations

import pytest
import torch

from dilatedseg.inference import (
    frontend_logits_tiled,
    frontend_tiles,
    network_tiled,
    predict_logits,
    predict_probabilities,
)
from dilatedseg.models import ContextModule, FrontEnd, Segmenter
from dilatedseg.module import SegmentationModule


def segmenter(padding: str, context: bool, upsample: str = "bilinear",
              dilations: tuple[int, ...] = (1, 2, 4, 1)) -> Segmenter:
    torch.manual_seed(0)
    frontend = FrontEnd(5, arch="tiny", padding=padding, dropout=0.0)
    for param in frontend.parameters():  # weights large enough that tile seams would show
        torch.nn.init.normal_(param, std=0.2)
    module = ContextModule(5, dilations=list(dilations)) if context else None
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
    with pytest.raises(ValueError, match=r"tile_size .* got \[16\]"):  # (was: an IndexError
        SegmentationModule(4, arch="tiny", tile_size=[16])  # at the first evaluated batch)


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


# A context module whose receptive field (1 + 2 (1 + 2 + 4 + 8) = 31 cells) is wider than the
# tiles below (2 to 8 cells), as Dilation10's 259 cells are wider than the authors' 128-cell tiles.
WIDE = (1, 2, 4, 8, 1)


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("upsample", ["deconv", "bilinear", "zoom"])
def test_whole_network_per_tile_depends_on_its_tile_alone(padding, upsample):
    """Every tile's output, partial edge tiles included, is the rest of the network run on that
    tile's front-end logits alone, at the tile's output size (with its image crop)."""
    model = segmenter(padding, True, upsample, dilations=WIDE)
    image = torch.rand(2, 3, 61, 83) * 255
    with torch.no_grad():
        frontend = model.frontend_logits(image)  # equal to the tiles' front-end logits
        for tile in [(16, 24), (40, 32), (64, 64)]:
            tiled = predict_logits(model, image, tile, tile_whole_network=True)
            assert tiled.shape == (2, 5, 61, 83)
            cells = 0
            for (top, bottom, left, right), _ in frontend_tiles(model, image, tile):
                y0, x0 = 8 * top, 8 * left
                y1, x1 = min(8 * bottom, 61), min(8 * right, 83)
                alone = model.from_frontend_logits(frontend[..., top:bottom, left:right],
                                                   (y1 - y0, x1 - x0), image[..., y0:y1, x0:x1])
                scale = alone.abs().max()
                torch.testing.assert_close(tiled[..., y0:y1, x0:x1] / scale, alone / scale,
                                           atol=1e-4, rtol=0)
                cells += (bottom - top) * (right - left)
            assert cells == 8 * 11  # the tiles cover the 1/8 grid once


def test_whole_network_per_tile_on_one_tile_is_whole_image_inference():
    model = segmenter("valid", True, "deconv", dilations=WIDE)
    image = torch.rand(1, 3, 64, 88) * 255
    with torch.no_grad():
        whole = model(image)
        assert predict_logits(model, image, (64, 88), tile_whole_network=True).equal(whole)
        assert predict_logits(model, image, (200, 200), tile_whole_network=True).equal(whole)
        # One tile run through the tiled path (not the shortcut) gives the same.
        scale = whole.abs().max()
        torch.testing.assert_close(network_tiled(model, image, (64, 88)) / scale,
                                   whole / scale, atol=1e-4, rtol=0)


def test_whole_network_per_tile_differs_where_the_context_crosses_a_seam():
    """Two 64 x 64 tiles (1 x 2, as Cityscapes' 1024 x 2048 in 1024 x 1024 tiles): the left
    tile's output ignores the right tile's image; the default (exact) mode does not."""
    model = segmenter("valid", True, "deconv", dilations=WIDE)
    image = torch.rand(1, 3, 64, 128) * 255
    changed = image.clone()
    changed[..., 96:] = 255 - changed[..., 96:]  # > 23 px (the front-end's margin) past the seam
    with torch.no_grad():
        per_tile = predict_logits(model, image, (64, 64), tile_whole_network=True)
        exact = predict_logits(model, image, (64, 64))
        whole = model(image)
        scale = whole.abs().max()
        torch.testing.assert_close(exact / scale, whole / scale, atol=1e-4, rtol=0)
        assert not torch.allclose(per_tile / scale, whole / scale, atol=1e-2)
        left = model(image[..., :64])  # the left tile on its own is a whole 64 x 64 image
        frontend = frontend_logits_tiled(model, image, (64, 64))
        torch.testing.assert_close(
            per_tile[..., :64] / scale,
            model.from_frontend_logits(frontend[..., :8], (64, 64), image[..., :64]) / scale,
            atol=1e-4, rtol=0)
        # The left tile's front-end reads 23 px of the right one, its context nothing more:
        assert not torch.allclose(left, per_tile[..., :64], atol=1e-2)
        other = predict_logits(model, changed, (64, 64), tile_whole_network=True)
        assert other[..., :64].equal(per_tile[..., :64])
        assert not torch.allclose(predict_logits(model, changed, (64, 64))[..., :64],
                                  exact[..., :64], atol=1e-2)
        probs = predict_probabilities(model, image, (64, 64), tile_whole_network=True)
        torch.testing.assert_close(probs, per_tile.softmax(1))


@pytest.mark.parametrize("crf", ["none", "dense"])
def test_module_runs_the_whole_network_per_tile_when_asked(crf):
    """The hparam reaches validation and predict; a dense CRF runs per tile on its image crop."""
    kwargs = dict(arch="tiny", padding="valid", stage="context", dilations=list(WIDE),
                  tile_size=(16, 16), crf=crf, crf_options={"test_iterations": 2})
    exact = SegmentationModule(4, **kwargs).eval()
    per_tile = SegmentationModule(4, tile_whole_network=True, **kwargs).eval()
    per_tile.load_state_dict(exact.state_dict())
    image = torch.rand(1, 3, 40, 56) * 255
    batch = {"image": image, "label": torch.zeros(1, 40, 56, dtype=torch.long), "name": ["a"]}
    with torch.no_grad():
        expected = network_tiled(per_tile.model, image, (16, 16))
        if crf == "dense":  # the top-left tile: the CRF saw its 16 x 16 crop alone
            alone = per_tile.model.from_frontend_logits(
                per_tile.model.frontend_logits(image)[..., :2, :2], (16, 16), image[..., :16, :16])
            torch.testing.assert_close(expected[..., :16, :16], alone, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(per_tile.batch_logits(batch), expected)
        prediction = per_tile.predict_step(batch, 0)["prediction"]
        assert prediction.equal(expected.argmax(1).to(torch.uint8))
        assert not torch.allclose(exact.batch_logits(batch), expected)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_cli_option_reaches_validate(tiny_shapes, tmp_path, monkeypatch, checkpoint):
    """--model.tile_whole_network=true reaches predict_logits, with init_from weights (as the
    authors' converted models are evaluated) and over a checkpoint's own hyperparameters."""
    from conftest import run_cli, shapes_args, untrained_checkpoint

    import dilatedseg.module

    seen = []

    def recording(segmenter, image, tile=None, tile_whole_network=False):
        seen.append((tile, tile_whole_network))
        return predict_logits(segmenter, image, tile, tile_whole_network)

    monkeypatch.setattr(dilatedseg.module, "predict_logits", recording)
    weights = untrained_checkpoint(tmp_path / "model.ckpt", 4, padding="same")
    if checkpoint:  # its hyperparameters say tile_whole_network: false
        import lightning

        saved = torch.load(weights, weights_only=False)
        assert saved["hyper_parameters"]["tile_whole_network"] is False
        torch.save({**saved, "pytorch-lightning_version": lightning.__version__}, weights)
    source = f"--ckpt_path={weights}" if checkpoint else f"--model.init_from={weights}"
    run_cli("validate", *shapes_args(tiny_shapes, tmp_path / "runs", source,
                                     "--trainer.limit_val_batches=1",
                                     "--model.tile_size=[16,16]",
                                     "--model.tile_whole_network=true"))
    assert seen and all(args == ([16, 16], True) for args in seen), seen


def test_checkpoint_tiling_stays_when_validate_does_not_set_it(tiny_shapes, tmp_path,
                                                               monkeypatch):
    """A checkpoint saved with tile_size and tile_whole_network evaluates tiled as saved when
    the command sets neither (the default false of tile_whole_network is not the user's)."""
    import lightning
    from conftest import run_cli, shapes_args, untrained_checkpoint

    import dilatedseg.module

    seen = []

    def recording(segmenter, image, tile=None, tile_whole_network=False):
        seen.append((tile, tile_whole_network))
        return predict_logits(segmenter, image, tile, tile_whole_network)

    monkeypatch.setattr(dilatedseg.module, "predict_logits", recording)
    weights = untrained_checkpoint(tmp_path / "model.ckpt", 4, padding="same",
                                   tile_size=[16, 16], tile_whole_network=True)
    saved = torch.load(weights, weights_only=False)
    torch.save({**saved, "pytorch-lightning_version": lightning.__version__}, weights)
    run_cli("validate", *shapes_args(tiny_shapes, tmp_path / "runs", f"--ckpt_path={weights}",
                                     "--trainer.limit_val_batches=1"))
    assert seen and all(args == ([16, 16], True) for args in seen), seen
