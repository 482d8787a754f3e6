"""albumentations pipelines reproducing the paper's augmentation.

Training: optional random scaling (off in the paper), padding up to the crop size (the image
reflected, the label filled with 255 so padded pixels are ignored), random crop, random mirror.
Evaluation uses whole images, untouched. (In ``valid`` geometry the front-end itself
reflect-pads every input by its 186 px margin, so crops need no extra context padding here.)
"""

from __future__ import annotations

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no online version check

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from albumentations.augmentations.geometric import functional as fgeometric  # noqa: E402

IGNORE_INDEX = 255


class ReflectPadIfNeeded(A.PadIfNeeded):
    """Pad (centred) up to a minimum size: the image by reflection, the mask with 255.

    albumentations applies one border mode to image and mask; a reflected mask would invent
    labels in the padding, so the mask is padded with the ignore value instead.
    """

    def __init__(self, min_height: int, min_width: int, fill_mask: int = IGNORE_INDEX):
        super().__init__(min_height=min_height, min_width=min_width,
                         border_mode=cv2.BORDER_REFLECT_101, fill=0, fill_mask=fill_mask, p=1.0)

    def apply_to_mask(self, mask: np.ndarray, pad_top: int, pad_bottom: int, pad_left: int,
                      pad_right: int, **params) -> np.ndarray:
        return fgeometric.pad_with_params(mask, pad_top, pad_bottom, pad_left, pad_right,
                                          border_mode=cv2.BORDER_CONSTANT, value=self.fill_mask)


def train_transform(
    crop_size: tuple[int, int] | None,
    mirror: bool = True,
    scale_range: tuple[float, float] | None = None,
) -> A.Compose | None:
    """Scale jitter (optional), reflect-pad to the crop, random crop, random mirror."""
    steps: list[A.BasicTransform] = []
    if scale_range is not None:
        low, high = scale_range
        steps.append(A.RandomScale(scale_limit=(low - 1.0, high - 1.0),
                                   interpolation=cv2.INTER_LINEAR,
                                   mask_interpolation=cv2.INTER_NEAREST, p=1.0))
    if crop_size is not None:
        height, width = crop_size
        steps.append(ReflectPadIfNeeded(height, width))
        steps.append(A.RandomCrop(height=height, width=width))
    if mirror:
        steps.append(A.HorizontalFlip(p=0.5))
    return A.Compose(steps) if steps else None
