"""Palettes, colourised label maps and overlays for looking at predictions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from dilatedseg.labels import IGNORE_INDEX

IGNORE_COLOUR = (0, 0, 0)


def voc_palette(count: int = 256) -> list[tuple[int, int, int]]:
    """The Pascal VOC colour map: bits of the class index spread over R, G and B."""
    colours = []
    for index in range(count):
        r = g = b = 0
        value = index
        for shift in range(7, -1, -1):
            r |= ((value >> 0) & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        colours.append((r, g, b))
    return colours


def palette_table(palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(256, 3) uint8 lookup table: class colours, then black (255 = ignore is black too)."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8).reshape(-1, 3)
    table[IGNORE_INDEX] = IGNORE_COLOUR
    return table


def colourise(label: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) class indices -> (H, W, 3) uint8 RGB."""
    return palette_table(palette)[label.astype(np.uint8)]


def palette_png(label: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """An index PNG ("P" mode) whose embedded palette shows the classes in colour."""
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette(palette_table(palette).flatten().tolist())
    return image


def overlay(image: np.ndarray, label: np.ndarray, palette: Sequence[Sequence[int]],
            alpha: float = 0.5) -> np.ndarray:
    """Blend the colourised label over an (H, W, 3) uint8 image; ignored pixels stay as is."""
    colour = colourise(label, palette).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colour
    keep = (label == IGNORE_INDEX)[..., None]
    return np.where(keep, image, blended).clip(0, 255).astype(np.uint8)
