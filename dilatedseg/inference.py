"""Whole-image and tiled inference.

The image is cut into non-overlapping tiles in the front-end's *output* space (1/8
resolution); each tile's input is cut from the padded image with the front-end's full
receptive-field margin around it, so every tile's front-end logits equal the corresponding part
of whole-image inference. In ``valid`` geometry the margin is the same 186 px reflection
(VGG-16) whole-image inference uses, and a tile of n x m logits reads exactly 8n + 372 by
8m + 372 input pixels, as the authors' deploy tiles do (REFERENCE sec. 4: Cityscapes 1396 x 1396
input, 1024 x 1024 output). What follows the front-end runs in one of two ways:

- default (``tile_whole_network=False``): the stitched 1/8 front-end logits go through the
  context module, the upsampling and the CRF once, on the whole image. The result equals
  whole-image inference (up to float rounding): tiling only bounds the front-end's memory. This
  is *not* what the authors computed whenever the context module's receptive field (Dilation10:
  259 cells) reaches across a tile's border.
- ``tile_whole_network=True``: the authors' ``test.py`` scheme, which runs the whole deploy
  network per tile: every tile's front-end logits go through the context module (its padding at
  the *tile's* borders), the upsampling to the tile's output size (Cityscapes: the grouped
  deconvolution, 128 x 128 -> 1024 x 1024) and the CRF on the tile's image crop, and the tiles'
  full-resolution outputs are stitched. Each tile's output depends on that tile's image alone
  (plus the front-end's margin); the result differs from whole-image inference wherever the
  context module or the upsampling reaches across a seam. Softmax is per pixel, so taking it per
  tile (as the authors did) or after stitching is the same.

Tiles start at the top left; the last row and column take what is left and run at their own
size (the authors' ``test.py`` instead reflect-pads a partial tile, or an image smaller than one
tile, up to the full deploy size, so near the right and bottom edges of such images the two
differ; Cityscapes' 1024 x 2048 is exactly 1 x 2 tiles). An image no larger than one tile is one
whole-image pass in both modes. With ``upsample: zoom`` the per-tile mode interpolates each
tile on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from dilatedseg.models.frontend import OUTPUT_STRIDE, receptive_field
from dilatedseg.models.segmenter import Segmenter


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


def network_tiled(segmenter: Segmenter, image: torch.Tensor,
                  tile: tuple[int, int]) -> torch.Tensor:
    """Full-resolution logits (B, C, H, W), the whole network run per tile (the authors'
    ``test.py``): each tile's front-end logits through
    :meth:`Segmenter.from_frontend_logits` at the tile's output size, with its image crop."""
    height, width = image.shape[-2:]

    def tiles():
        for (top, bottom, left, right), logits in frontend_tiles(segmenter, image, tile):
            y0, x0 = top * OUTPUT_STRIDE, left * OUTPUT_STRIDE
            y1, x1 = min(bottom * OUTPUT_STRIDE, height), min(right * OUTPUT_STRIDE, width)
            crop = image[..., y0:y1, x0:x1]
            yield (y0, y1, x0, x1), segmenter.from_frontend_logits(logits, (y1 - y0, x1 - x0),
                                                                   crop)

    return _stitch(tiles(), (height, width))


def predict_logits(segmenter: Segmenter, image: torch.Tensor,
                   tile: int | tuple[int, int] | None = None,
                   tile_whole_network: bool = False) -> torch.Tensor:
    """(B, 3, H, W) 0-255 RGB image -> (B, C, H, W) logits, whole or tiled.

    ``tile``: None for one pass over the whole image, else the (height, width) of a tile in
    output pixels (rounded up to multiples of 8), e.g. (1024, 1024) for Cityscapes as in the
    paper. Images no larger than one tile take the whole-image path.
    ``tile_whole_network``: False tiles only the front-end (equal to whole-image inference);
    True runs context module, upsampling and CRF per tile too, as the authors' ``test.py``
    (see the module's docstring). No effect without ``tile``.
    """
    if tile is None:
        return segmenter(image)
    tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if image.shape[-2] <= tile[0] and image.shape[-1] <= tile[1]:
        return segmenter(image)
    if tile_whole_network:
        return network_tiled(segmenter, image, tile)
    return segmenter.from_frontend_logits(frontend_logits_tiled(segmenter, image, tile),
                                          image.shape[-2:], image)


def predict_probabilities(segmenter: Segmenter, image: torch.Tensor,
                          tile: int | tuple[int, int] | None = None,
                          tile_whole_network: bool = False) -> torch.Tensor:
    """Softmax of :func:`predict_logits` (per pixel: the same whether taken per tile or after
    stitching)."""
    return F.softmax(predict_logits(segmenter, image, tile, tile_whole_network), dim=1)
