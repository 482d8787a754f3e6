"""Whole-image and tiled inference.

Tiling follows the paper's scheme (REFERENCE sec. 4) in a form that is exact: the image is cut
into non-overlapping tiles in the front-end's *output* space (1/8 resolution); each tile's
input is cut from the padded image with the front-end's full receptive-field margin around it,
so every tile's logits equal the corresponding part of whole-image inference. In ``valid``
geometry the margin is the same 186 px reflection (VGG-16) whole-image inference uses, and a
tile of n x m logits reads exactly 8n + 372 by 8m + 372 input pixels. The stitched 1/8 logits
then go through the context module, upsampling and CRF once, on the whole image (these are cheap
at 1/8 resolution; the front-end is what needs tiling). Softmax is per pixel, so taking it per
tile or after stitching is the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dilatedseg.models.frontend import OUTPUT_STRIDE, receptive_field
from dilatedseg.models.segmenter import Segmenter


def frontend_logits_tiled(segmenter: Segmenter, image: torch.Tensor,
                          tile: tuple[int, int]) -> torch.Tensor:
    """Front-end logits (B, C, ceil(H/8), ceil(W/8)) computed tile by tile."""
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
    rows = []
    for top in range(0, out_h, cells_h):
        bottom = min(top + cells_h, out_h)
        row = []
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
            row.append(logits)
        rows.append(torch.cat(row, dim=-1))
    return torch.cat(rows, dim=-2)


def predict_logits(segmenter: Segmenter, image: torch.Tensor,
                   tile: int | tuple[int, int] | None = None) -> torch.Tensor:
    """(B, 3, H, W) 0-255 RGB image -> (B, C, H, W) logits, whole or tiled.

    ``tile``: None for one pass over the whole image, else the (height, width) of a tile in
    output pixels (rounded up to multiples of 8), e.g. (1024, 1024) for Cityscapes as in the
    paper. Images no larger than one tile take the whole-image path.
    """
    if tile is None:
        return segmenter(image)
    tile = (tile, tile) if isinstance(tile, int) else tuple(tile)
    if image.shape[-2] <= tile[0] and image.shape[-1] <= tile[1]:
        return segmenter(image)
    return segmenter.from_frontend_logits(frontend_logits_tiled(segmenter, image, tile),
                                          image.shape[-2:], image)


def predict_probabilities(segmenter: Segmenter, image: torch.Tensor,
                          tile: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Softmax of :func:`predict_logits`."""
    return F.softmax(predict_logits(segmenter, image, tile), dim=1)
