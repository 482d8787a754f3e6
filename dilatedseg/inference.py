"""Whole-image and tiled inference, in two modes.

- default (``tile_whole_network=False``): the image is cut into non-overlapping tiles in the
  front-end's *output* space (1/8 resolution, tile sizes rounded up to multiples of 8); each
  tile's input is cut from the padded image with the front-end's full receptive-field margin
  around it (in ``valid`` geometry the 186 px reflection whole-image inference uses), so the
  stitched 1/8 front-end logits equal whole-image inference, and they go through the context
  module, the upsampling and the CRF once, on the whole image. The result equals whole-image
  inference (up to float rounding): tiling only bounds the front-end's memory. An image no
  larger than one tile is one whole-image pass.
- ``tile_whole_network=True``: exactly the authors' ``test.py`` (fyu/dilation,
  ``test_image``). The normalised image is reflect-padded (REFLECT_101) by the front-end's
  margin m (186 px for VGG-16 ``valid``; 0 for ``same``). Tiles start at multiples of the tile
  size (the deploy *output* size, e.g. 1024 x 1024 for Cityscapes' 1396 x 1396 deploy input),
  ceil(image / tile) per axis; each deploy input is ``padded[top : top + tile + 2m,
  left : left + tile + 2m]``, reflect-padded at the bottom / right up to that full size where
  it runs past the padded image (the last row and column, or an image smaller than a tile:
  such an image is padded to the tile too; the reflection repeats when the pad is longer than
  the tile). The whole network (front-end, context module with its padding at the *deploy
  input's* borders) runs on every full deploy input, and all of each tile's output cells,
  those past the image included, are concatenated. ``upsample: zoom`` (their ``interp_map``,
  zoom 8) then interpolates the *stitched* probabilities, so a tile's last pixels interpolate
  with the next tile's first cell and the image's last rows / columns with cells computed from
  the reflected padding; ``deconv`` / ``bilinear`` upsample each tile's full output as the net
  does (zoom 1) and the stitched result is cropped to the image. The tiles' outputs sit
  ``tile`` px apart while each tile holds ceil(tile / 8) cells, so an axis with several tiles
  needs a tile size that is a multiple of 8 (KITTI's 1268 px wide tile covers its images in
  one): anything else stops before the image's first tile runs. Where the image's last pixels
  fall in the stitched map's last row or column of cells (an image within 8 px of n whole
  tiles, e.g. exactly n tiles high), ``interp_map`` reads one cell past its array, unchecked:
  the cells :func:`interp_map_cells` describes, read the same here, except past the last
  class's map, where ``test.py`` reads memory outside the array (no defined value) and this
  reads probability 0. ``test.py`` has no CRF; here the CRF (dense or CRF-RNN) runs
  once, on the stitched full-resolution output with the whole image, as the paper's CRFs
  refined whole images, rather than on each tile's crop alone.

Softmax is per pixel, so taking it per tile (as the authors did) or after stitching is the
same; ``zoom`` works on log-probabilities (see :func:`~dilatedseg.models.segmenter.
zoom_log_probabilities`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from dilatedseg.models.frontend import OUTPUT_STRIDE, receptive_field, reflect_pad
from dilatedseg.models.segmenter import Segmenter, zoom_log_probabilities
from dilatedseg.runs import RunError


def frontend_tiles(segmenter: Segmenter, image: torch.Tensor, tile: tuple[int, int]
                   ) -> Iterator[tuple[tuple[int, int, int, int], torch.Tensor]]:
    """Front-end logits tile by tile, row by row: yields the tile's (top, bottom, left, right)
    in 1/8 cells of the output grid and its logits (B, C, bottom - top, right - left).

    ``tile``: (height, width) in output pixels, rounded up to multiples of 8."""
    frontend = segmenter.frontend
    height, width = image.shape[-2:]
    out_h, out_w = math.ceil(height / OUTPUT_STRIDE), math.ceil(width / OUTPUT_STRIDE)
    cells_h = max(1, math.ceil(tile[0] / OUTPUT_STRIDE))
    cells_w = max(1, math.ceil(tile[1] / OUTPUT_STRIDE))
    normalised = segmenter.normalise(image)
    if frontend.padding == "valid":
        m = frontend.margin
        padded = frontend.pad_input(normalised)
    else:
        # Zero-padded convolutions: a margin past the receptive-field radius, on the pooling grid.
        radius = receptive_field(frontend.arch) // 2 + OUTPUT_STRIDE
        m = math.ceil(radius / OUTPUT_STRIDE) * OUTPUT_STRIDE
    for top in range(0, out_h, cells_h):
        bottom = min(top + cells_h, out_h)
        for left in range(0, out_w, cells_w):
            right = min(left + cells_w, out_w)
            y0, x0 = top * OUTPUT_STRIDE, left * OUTPUT_STRIDE
            y1, x1 = bottom * OUTPUT_STRIDE, right * OUTPUT_STRIDE
            if frontend.padding == "valid":
                crop = padded[..., y0: y1 + 2 * m, x0: x1 + 2 * m]
                logits = frontend.final(frontend.features(crop))
            else:
                cy0, cx0 = max(0, y0 - m), max(0, x0 - m)
                crop = normalised[..., cy0: min(height, y1 + m), cx0: min(width, x1 + m)]
                logits = frontend(crop)
                oy, ox = (y0 - cy0) // OUTPUT_STRIDE, (x0 - cx0) // OUTPUT_STRIDE
                logits = logits[..., oy: oy + bottom - top, ox: ox + right - left]
            yield (top, bottom, left, right), logits


def _stitch(pieces: Iterator[tuple[tuple[int, int, int, int], torch.Tensor]],
            size: tuple[int, int]) -> torch.Tensor:
    """Pieces (top, bottom, left, right) -> one (B, C, *size) tensor."""
    out = None
    for (top, bottom, left, right), part in pieces:
        if out is None:
            out = part.new_empty((*part.shape[:-2], *size))
        out[..., top:bottom, left:right] = part
    return out


def frontend_logits_tiled(segmenter: Segmenter, image: torch.Tensor,
                          tile: tuple[int, int]) -> torch.Tensor:
    """Front-end logits (B, C, ceil(H/8), ceil(W/8)) computed tile by tile."""
    height, width = image.shape[-2:]
    size = (math.ceil(height / OUTPUT_STRIDE), math.ceil(width / OUTPUT_STRIDE))
    return _stitch(frontend_tiles(segmenter, image, tile), size)


def check_deploy_tiles(size: tuple[int, int], tile: tuple[int, int]) -> None:
    """Refuse an image that needs several tiles along an axis whose tile size is not a multiple
    of 8: ``test.py`` would stitch ceil(tile / 8) cells per tile at ``tile`` px apart."""
    for axis, length, tile_length in zip(("height", "width"), size, tile):
        if length > tile_length and tile_length % OUTPUT_STRIDE:
            lower = tile_length // OUTPUT_STRIDE * OUTPUT_STRIDE
            raise RunError(
                f"tile_whole_network: a {size[0]}x{size[1]} image needs several tiles along its "
                f"{axis}, whose tile size {tile_length} px is not a multiple of "
                f"{OUTPUT_STRIDE}, so the tiles' outputs would not line up: set that "
                f"--model.tile_size entry to a multiple of {OUTPUT_STRIDE} "
                f"({lower or OUTPUT_STRIDE} or {lower + OUTPUT_STRIDE}), or to at least "
                f"{length} to cover the image in one tile")


def interp_map_cells(log_probabilities: torch.Tensor) -> torch.Tensor:
    """(B, C, R, W) stitched log-probabilities -> (B, C, R + 1, W + 1): the cells the authors'
    ``interp_map`` reads, one row and one column past the map included.

    Their numba code checks no bounds, so it reads cell (c, r, w) at offset (c R + r) W + w of
    the C-ordered (C, R, W) array: one column past row r is row r + 1's first cell (the image's
    left edge), one row past class c's map is class c + 1's first row. Past the last value
    (the last class's extra row, and its last row's extra cell) it reads whatever memory
    follows the array, which has no defined value: here probability 0 (log 0), which adds
    nothing to the interpolation."""
    batch, classes, rows, cols = log_probabilities.shape
    flat = F.pad(log_probabilities.reshape(batch, -1), (0, cols + 1), value=-math.inf)
    device = log_probabilities.device
    row_starts = (torch.arange(classes, device=device)[:, None] * rows
                  + torch.arange(rows + 1, device=device)) * cols
    return flat[:, row_starts[..., None] + torch.arange(cols + 1, device=device)]


def network_tiled(segmenter: Segmenter, image: torch.Tensor,
                  tile: tuple[int, int]) -> torch.Tensor:
    """Full-resolution logits (B, C, H, W) as the authors' ``test.py`` computed them: the whole
    network on every full-size deploy tile, stitched, then interpolated (``zoom``) or cropped,
    then the CRF once (see the module's docstring). ``tile``: the deploy output size."""
    height, width = image.shape[-2:]
    check_deploy_tiles((height, width), tile)
    frontend = segmenter.frontend
    m = frontend.margin
    input_h, input_w = tile[0] + 2 * m, tile[1] + 2 * m
    padded = reflect_pad(segmenter.normalise(image), (m, m, m, m))
    rows = []
    for top in range(0, height, tile[0]):
        row = []
        for left in range(0, width, tile[1]):
            crop = padded[..., top: top + input_h, left: left + input_w]
            crop = reflect_pad(crop, (0, input_w - crop.shape[-1], 0, input_h - crop.shape[-2]))
            logits = segmenter.refine(frontend.final(frontend.features(crop)))
            if segmenter.upsample != "zoom":  # the net's own upsampling, all of it
                cells = logits.shape[-2:]
                logits = segmenter.upsample_to(logits, (OUTPUT_STRIDE * cells[0],
                                                        OUTPUT_STRIDE * cells[1]))
            row.append(logits)
        rows.append(torch.cat(row, dim=-1))
    stitched = torch.cat(rows, dim=-2)
    if segmenter.upsample == "zoom":  # as upsample_to, on the cells interp_map reads
        log_probabilities = F.log_softmax(stitched.float(), dim=1)
        logits = zoom_log_probabilities(interp_map_cells(log_probabilities), (height, width))
    else:
        logits = stitched[..., :height, :width]
    return logits if segmenter.crf is None else segmenter.crf(logits, image)


def predict_logits(segmenter: Segmenter, image: torch.Tensor,
                   tile: int | tuple[int, int] | None = None,
                   tile_whole_network: bool = False) -> torch.Tensor:
    """(B, 3, H, W) 0-255 RGB image -> (B, C, H, W) logits, whole or tiled.

    ``tile``: None for one pass over the whole image, else the (height, width) of a tile in
    output pixels, e.g. (1024, 1024) for Cityscapes as in the paper.
    ``tile_whole_network``: False tiles only the front-end (tile sizes rounded up to multiples
    of 8; equal to whole-image inference, and an image no larger than one tile is one
    whole-image pass); True is the authors' ``test.py`` with ``tile`` as their deploy output
    size (input - 372), every image padded to whole tiles (see the module's docstring). No
    effect without ``tile``.
    """
    if tile is None:
        return segmenter(image)
    tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if tile_whole_network:
        return network_tiled(segmenter, image, tile)
    if image.shape[-2] <= tile[0] and image.shape[-1] <= tile[1]:
        return segmenter(image)
    return segmenter.from_frontend_logits(frontend_logits_tiled(segmenter, image, tile),
                                          image.shape[-2:], image)


def predict_probabilities(segmenter: Segmenter, image: torch.Tensor,
                          tile: int | tuple[int, int] | None = None,
                          tile_whole_network: bool = False) -> torch.Tensor:
    """Softmax of :func:`predict_logits` (per pixel: the same whether taken per tile or after
    stitching)."""
    return F.softmax(predict_logits(segmenter, image, tile, tile_whole_network), dim=1)
