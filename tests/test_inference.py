"""Tiled inference equals whole-image inference, in both geometries, with and without context;
with ``tile_whole_network`` it computes what the authors' test.py computed."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from dilatedseg.inference import (
    frontend_logits_tiled,
    network_tiled,
    predict_logits,
    predict_probabilities,
)
from dilatedseg.models import ContextModule, FrontEnd, Segmenter
from dilatedseg.models.frontend import reflect_pad
from dilatedseg.module import SegmentationModule
from dilatedseg.runs import RunError


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


def test_reflect_pad_repeats_as_opencv_reflect_101():
    """The tiles' bottom / right pad: as cv2.copyMakeBorder(BORDER_REFLECT_101), also when
    the pad is longer than the tile (the reflection repeats) and on 1 px wide tiles."""
    rng = np.random.default_rng(0)
    for shape, pad in [((5, 7), (0, 3, 0, 2)), ((5, 7), (0, 20, 0, 13)), ((3, 2), (4, 9, 5, 11)),
                       ((1, 4), (0, 6, 0, 5)), ((1, 1), (0, 3, 0, 2))]:
        image = rng.random((*shape, 3), dtype=np.float32)
        left, right, top, bottom = pad
        expected = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_REFLECT_101)
        ours = reflect_pad(torch.from_numpy(image).permute(2, 0, 1), pad)
        assert np.array_equal(ours.permute(1, 2, 0).numpy(), expected)


def interp_map(prob: np.ndarray, zoom: int, width: int, height: int) -> np.ndarray:
    """fyu/dilation util.interp_map, written out: output pixel (h, w) sits at cell (h / zoom,
    w / zoom), bilinear between the cells around it. Its numba code checks no bounds, so the
    last pixels of an image that ends in the map's last row or column of cells read one cell
    past it, at that cell's offset (c R + r) W + w in the C-ordered (C, R, W) array, as
    ``memory`` here. Past the array's end (the last class) test.py reads whatever memory
    follows it, which has no defined value: 0 here, the value ours takes."""
    classes, rows, cols = prob.shape
    memory = np.concatenate([prob.ravel(), np.zeros(cols + 1, dtype=prob.dtype)])

    def cell(c: int, r: int, w: int) -> float:
        return memory[(c * rows + r) * cols + w]

    out = np.zeros((classes, height, width), dtype=np.float32)
    for c in range(classes):
        for h in range(height):
            for w in range(width):
                row, col = h // zoom, w // zoom
                down, right = h / zoom - row, w / zoom - col
                left_value = (1 - down) * cell(c, row, col) + down * cell(c, row + 1, col)
                right_value = (1 - down) * cell(c, row, col + 1) + down * cell(c, row + 1,
                                                                              col + 1)
                out[c, h, w] = (1 - right) * left_value + right * right_value
    return out


def deploy_net(model: Segmenter, tile: np.ndarray) -> np.ndarray:
    """The deploy network on one full (H, W, 3) mean-subtracted input: softmax (C, h, w)."""
    with torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1)))[None]
        logits = model.refine(model.frontend.final(model.frontend.features(x)))
        if model.upsample == "deconv":
            logits = torch.nn.functional.conv_transpose2d(
                logits, model.deconv_weight, stride=8, padding=4, groups=logits.shape[1])
        return logits.softmax(1)[0].numpy()


def authors_test_image(model: Segmenter, image: np.ndarray, tile: tuple[int, int]
                       ) -> np.ndarray:
    """fyu/dilation test.py's test_image on an (H, W, 3) 0-255 image, step by step, with
    label_margin = the front-end's margin and output size = ``tile``: (C, H, W) probabilities."""
    margin = model.frontend.margin
    image = image.astype(np.float32) - model.pixel_mean.view(3).numpy()
    height, width = image.shape[:2]
    padded = cv2.copyMakeBorder(image, margin, margin, margin, margin, cv2.BORDER_REFLECT_101)
    input_h, input_w = tile[0] + 2 * margin, tile[1] + 2 * margin
    rows = []
    for i in range(height // tile[0] + (1 if height % tile[0] else 0)):
        row = []
        for j in range(width // tile[1] + (1 if width % tile[1] else 0)):
            piece = padded[tile[0] * i: tile[0] * i + input_h, tile[1] * j: tile[1] * j + input_w]
            piece = cv2.copyMakeBorder(piece, 0, input_h - piece.shape[0], 0,
                                       input_w - piece.shape[1], cv2.BORDER_REFLECT_101)
            row.append(deploy_net(model, piece))
        rows.append(np.concatenate(row, axis=2))
    prob = np.concatenate(rows, axis=1)
    if model.upsample == "zoom":
        return interp_map(prob, 8, width, height)
    return prob[:, :height, :width]


# (image height, width), tile: 3 x 3 tiles with partial ones; an image ending on a tile's end
# (its height; both sides; both within 8 px of it: interp_map reads past its map there); an
# image smaller than its tile; a pad longer than the tile (repeated reflection); one tile whose
# width is no multiple of 8 (as KITTI's 1268), the image ending in its last cells or not.
AUTHORS_CASES = [((61, 83), (24, 32)), ((48, 83), (24, 32)), ((48, 64), (24, 32)),
                 ((45, 62), (24, 32)), ((13, 21), (24, 32)), ((5, 6), (64, 64)),
                 ((17, 30), (24, 36)), ((20, 36), (24, 36))]


@pytest.mark.parametrize("padding", ["valid", "same"])
@pytest.mark.parametrize("upsample", ["zoom", "deconv"])
def test_whole_network_per_tile_is_the_authors_test_py(padding, upsample):
    """The authors' VOC / CamVid / KITTI geometry (zoom; VOC's Large context, valid padding)
    and Cityscapes' (deconv; Basic, same padding), with their mean-only normalisation.
    Where interp_map reads past its map, its values need not sum to 1: compared normalised
    per pixel, as the argmax sees them."""
    torch.manual_seed(0)
    frontend = FrontEnd(5, arch="tiny", padding=padding, dropout=0.0)
    for param in frontend.parameters():  # logits of a few units: probabilities not saturated
        torch.nn.init.normal_(param, std=0.06)
    variant, context_padding = ("large", "valid") if upsample == "zoom" else ("basic", "same")
    context = ContextModule(5, variant=variant, dilations=WIDE, padding=context_padding)
    model = Segmenter(frontend, context, upsample=upsample, pixel_mean=(120.0, 110.0, 100.0),
                      pixel_std=(1.0, 1.0, 1.0)).eval()
    rng = np.random.default_rng(0)
    for size, tile in AUTHORS_CASES:
        image = rng.integers(0, 256, (*size, 3)).astype(np.float32)
        expected = authors_test_image(model, image, tile)
        expected /= expected.sum(0)
        batch = torch.from_numpy(image).permute(2, 0, 1)[None]
        with torch.no_grad():
            ours = predict_probabilities(model, batch, tile, tile_whole_network=True)[0].numpy()
            whole = model(batch).softmax(1)[0].numpy()
        np.testing.assert_allclose(ours, expected, rtol=0, atol=2e-5, err_msg=f"{size} {tile}")
        assert expected.max() < 0.99  # not saturated: every class's probability counts
        # What the old per-tile mode ran on a lone tile, whole-image inference, differs:
        assert np.abs(whole - expected).max() > 1e-2


def test_several_tiles_along_an_axis_need_a_multiple_of_8():
    """test.py stitches ceil(tile / 8) cells per tile at ``tile`` px apart: refused before
    any tile runs where an axis has several tiles; one tile of any size is fine."""
    model = segmenter("valid", True, "zoom")
    calls = []
    model.frontend.features.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad(), pytest.raises(RunError, match=r"tile_whole_network: a 40x83 image "
                                        r"needs several tiles along its width, whose tile size "
                                        r"36 px is not a multiple of 8.*\(32 or 40\), or to "
                                        r"at least 83"):
        predict_logits(model, torch.rand(1, 3, 40, 83) * 255, (24, 36), tile_whole_network=True)
    assert not calls
    with torch.no_grad():
        out = predict_logits(model, torch.rand(1, 3, 40, 36) * 255, (24, 36), True)
    assert out.shape == (1, 5, 40, 36) and calls


def test_whole_network_per_tile_on_one_exact_tile_is_whole_image_inference():
    """An image of exactly one tile (sizes multiples of 8) needs no extra padding: whole-image
    inference. A smaller image is padded to the tile, as test.py (the old mode ran it whole)."""
    model = segmenter("valid", True, "deconv", dilations=WIDE)
    image = torch.rand(1, 3, 64, 88) * 255
    with torch.no_grad():
        whole = model(image)
        scale = whole.abs().max()
        torch.testing.assert_close(predict_logits(model, image, (64, 88), True) / scale,
                                   whole / scale, atol=1e-4, rtol=0)
        padded = predict_logits(model, image, (200, 200), tile_whole_network=True)
        assert padded.shape == whole.shape
        assert not torch.allclose(padded / scale, whole / scale, atol=1e-2)
        assert predict_logits(model, image, (200, 200)).equal(whole)  # default: whole image


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
    """The hparam reaches validation and predict; a dense CRF runs once, on the stitched
    output with the whole image (test.py has none; the paper's CRF saw whole images)."""
    kwargs = dict(arch="tiny", padding="valid", stage="context", dilations=list(WIDE),
                  tile_size=(16, 16), crf=crf, crf_options={"test_iterations": 2})
    exact = SegmentationModule(4, **kwargs).eval()
    per_tile = SegmentationModule(4, tile_whole_network=True, **kwargs).eval()
    per_tile.load_state_dict(exact.state_dict())
    image = torch.rand(1, 3, 40, 56) * 255
    batch = {"image": image, "label": torch.zeros(1, 40, 56, dtype=torch.long), "name": ["a"]}
    with torch.no_grad():
        expected = network_tiled(per_tile.model, image, (16, 16))
        if crf == "dense":
            dense, per_tile.model.crf = per_tile.model.crf, None
            unrefined = network_tiled(per_tile.model, image, (16, 16))
            per_tile.model.crf = dense
            torch.testing.assert_close(expected, dense(unrefined, image))
            assert not torch.allclose(expected, unrefined, atol=1e-3)
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


def test_cli_stops_on_tiles_that_cannot_stitch(tiny_shapes, tmp_path, capsys):
    """The multiple-of-8 error reaches the user as one line and exit code 2, no traceback."""
    from conftest import run_cli, shapes_args, untrained_checkpoint

    weights = untrained_checkpoint(tmp_path / "model.ckpt", 4, padding="same")
    with pytest.raises(SystemExit) as stopped:
        run_cli("validate", *shapes_args(tiny_shapes, tmp_path / "runs",
                                         f"--model.init_from={weights}",
                                         "--model.tile_size=[16,20]",
                                         "--model.tile_whole_network=true"))
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "error: tile_whole_network: a " in err and "tile size 20 px is not a multiple" in err
    assert "Traceback" not in err
