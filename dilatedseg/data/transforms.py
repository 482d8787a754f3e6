"""albumentations pipelines reproducing the paper's augmentation.

Training: optional random scaling (off in the paper), a random crop (an image smaller than the
crop is padded: reflected, its label filled with 255 so padded pixels are ignored), random
mirror. Evaluation uses whole images, untouched.

Context margin (the authors' scheme, in ``valid`` geometry): a training crop of h x w labels
comes with ``context_margin`` more image pixels on every side (186 for VGG-16: 628 x 628 image
crops around 256 x 256 labels for the urban datasets), cut from the image itself, which is
reflected only past its own border, as whole-image inference pads it. The front-end then runs
on the crop unpadded (``context_included``). Without the margin, the front-end reflect-pads
each crop, so the context it sees near a crop's edge is a mirror image of the crop.
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no online version check

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from dilatedseg.labels import IGNORE_INDEX  # noqa: E402
from dilatedseg.models.frontend import reflect_index  # noqa: E402


def window(array: np.ndarray, axis: int, start: int, length: int) -> np.ndarray:
    """``length`` pixels of ``array`` along ``axis`` from ``start``, reflected past its ends: a
    view when the window lies inside, else a gather (slicing is ~100x faster than indexing)."""
    size = array.shape[axis]
    if 0 <= start and start + length <= size:
        return array[(slice(None),) * axis + (slice(start, start + length),)]
    return array.take(reflect_index(size, -start, start + length - size).numpy(), axis)


class ContextCrop(A.DualTransform):
    """Random crop of ``height`` x ``width`` labels, with an image crop ``margin`` px larger on
    every side around them.

    The label crop lies inside the image where it fits (uniformly at random), else it is
    centred and the labels past the image are 255. The image crop is cut from the image
    reflected past its border (REFLECT_101), so its context is real wherever the image has it.
    Only the crop is copied, never a padded whole image.
    """

    def __init__(self, height: int, width: int, margin: int = 0):
        super().__init__(p=1.0)
        self.height, self.width, self.margin = height, width, margin

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        image_height, image_width = params["shape"][:2]

        def start(size: int, crop: int) -> int:
            return self.py_random.randint(0, size - crop) if size >= crop else -((crop - size) // 2)

        return {"top": start(image_height, self.height), "left": start(image_width, self.width)}

    def apply(self, img: np.ndarray, top: int, left: int, **params) -> np.ndarray:
        m = self.margin
        rows = window(img, 0, top - m, self.height + 2 * m)
        return window(rows, 1, left - m, self.width + 2 * m)

    def apply_to_mask(self, mask: np.ndarray, top: int, left: int, **params) -> np.ndarray:
        out = np.full((self.height, self.width, *mask.shape[2:]), IGNORE_INDEX, mask.dtype)
        y0, x0 = max(top, 0), max(left, 0)
        y1 = min(top + self.height, mask.shape[0])
        x1 = min(left + self.width, mask.shape[1])
        out[y0 - top: y1 - top, x0 - left: x1 - left] = mask[y0:y1, x0:x1]
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "margin")


def resize(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Image (area-averaged when shrinking, bilinear when enlarging) and label (nearest, centred
    samples) to ``size`` = (H, W)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image, label
    shrink = height * width < image.shape[0] * image.shape[1]
    image = cv2.resize(image, (width, height),
                       interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)
    return image, label


def train_transform(
    crop_size: tuple[int, int] | None,
    mirror: bool = True,
    scale_range: tuple[float, float] | None = None,
    context_margin: int = 0,
) -> A.Compose | None:
    """Scale jitter (optional), random crop (h x w labels, image crop 2 ``context_margin``
    larger), random mirror."""
    steps: list[A.BasicTransform] = []
    if scale_range is not None:
        low, high = scale_range
        steps.append(A.RandomScale(scale_limit=(low - 1.0, high - 1.0),
                                   interpolation=cv2.INTER_LINEAR,
                                   mask_interpolation=cv2.INTER_NEAREST, p=1.0))
    if crop_size is not None:  # (whole images need no margin: the front-end pads them alike)
        steps.append(ContextCrop(*crop_size, margin=context_margin))
    if mirror:
        steps.append(A.HorizontalFlip(p=0.5))
    return A.Compose(steps) if steps else None


def seed(transform: A.Compose, value: int) -> None:
    """Draw all of ``transform``'s randomness from one stream seeded with ``value``.

    (``Compose(seed=...)`` / ``set_random_seed`` give every step its own generator with the
    same seed: the crop offset and the mirror decision would then come from copies of one
    sequence.)"""
    transform.set_random_state(np.random.default_rng(value), random.Random(value))
