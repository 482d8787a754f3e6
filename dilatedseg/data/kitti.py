"""KITTI road scenes, in either of two labellings.

* ``layout: ros`` (default, the paper's): the 146 images labelled by Ros et al. (2015), as
  their archive KITTI_SEMANTIC/ holds them: Training_00/ (100 images) and Validation_07/ (46,
  the test set), each with RGB/ images and GT/ colour labels of the same name, in CamVid's
  11-class palette (black = void). The paper reports on the 46 test images, so ``val`` is the
  test set here too.
* ``layout: semantics``: the later KITTI semantic benchmark (data_semantics/, 200 labelled
  training images) whose labels are Cityscapes label ids; they are mapped to the 19 Cityscapes
  train ids and classes. It has no official val split: every ``val_every``-th training image
  (sorted by name) is held out for validation. Its test labels are not public (testing/ holds
  the images alone): ``dilatedseg test`` stops; predict them with ``predict_split: test``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dilatedseg.data import camvid, cityscapes
from dilatedseg.data.base import DataError, SegmentationDataModule, read_index_png
from dilatedseg.labels import IGNORE_INDEX

MEAN_BGR = (96.19, 95.55, 91.35)
VOID_COLOUR = (0, 0, 0)


class KITTIDataModule(SegmentationDataModule):
    """KITTI: 11 CamVid classes (``ros``) or 19 Cityscapes classes (``semantics``).

    Args:
        root: the dataset folder (see ``layout``).
        layout: "ros" or "semantics".
        val_every: ``semantics`` only: hold out every n-th training image for validation.
        **kwargs: see :class:`SegmentationDataModule`.
    """

    name = "kitti"
    classes = camvid.CLASSES
    palette = camvid.PALETTE
    mean_rgb = MEAN_BGR[::-1]
    layouts = ("ros", "semantics")
    source = ("layout ros: KITTI_SEMANTIC/, the KITTI images labelled by Ros et al. (2015), "
              "http://adas.cvc.uab.es/s2uad; layout semantics: data_semantics.zip of the KITTI "
              "semantic segmentation benchmark (cvlibs.net)")
    layout = """\
        layout: ros (Ros et al. labels, the paper's; root = KITTI_SEMANTIC/)
          Training_00/RGB/<name>.png    Training_00/GT/<name>.png     colour labels, CamVid
          Validation_07/RGB/<name>.png  Validation_07/GT/<name>.png   palette (black = void)
        layout: semantics (the KITTI semantic benchmark, root = data_semantics/)
          training/image_2/<name>.png  training/semantic/<name>.png   Cityscapes label ids
          testing/image_2/<name>.png
    """

    def __init__(self, root: str = "data/kitti", layout: str = "ros", val_every: int = 5,
                 **kwargs):
        super().__init__(root=root, **kwargs)
        self.choose_layout(layout)
        if val_every < 2:
            raise ValueError(f"val_every must be >= 2 (every n-th image held out), got {val_every}")
        self.val_every = val_every
        if layout == "semantics":  # Cityscapes classes; predictions written back as label ids
            self.classes, self.palette = cityscapes.CLASSES, cityscapes.PALETTE
            self.categories = cityscapes.CATEGORIES
            self.unlabelled_splits = ("test",)
            self.train_ids = cityscapes.train_id_lookup()
            self.submission_ids = cityscapes.label_id_lookup()
        else:
            self.colours = {colour: i for i, colour in enumerate(camvid.PALETTE)}
            self.colours[VOID_COLOUR] = IGNORE_INDEX

    def pairs(self, split: str) -> list[tuple[Path, Path | None]]:
        if self.layout_name == "ros":
            folder = self.root / ("Training_00" if split == "train" else "Validation_07")
            return [(image, folder / "GT" / image.name) for image in self.images_in(folder / "RGB")]
        if split == "test":
            return [(image, None) for image in self.images_in(self.root / "testing" / "image_2")]
        images = self.images_in(self.root / "training" / "image_2")
        if len(images) < self.val_every:
            raise DataError(
                f"kitti: {self.root / 'training' / 'image_2'} holds {len(images)} image(s); "
                f"every {self.val_every}th (val_every) is held out for validation, so none "
                f"would be: lower {self.option_prefix}val_every (at least 2), or add images")
        held_out = [i % self.val_every == self.val_every - 1 for i in range(len(images))]
        return [(image, self.root / "training" / "semantic" / image.name)
                for image, out in zip(images, held_out) if out == (split == "val")]

    def read_label(self, path: Path) -> np.ndarray:
        if self.layout_name == "ros":
            return camvid.decode_colour_label(path, self.colours)
        return self.train_ids[read_index_png(path)]
