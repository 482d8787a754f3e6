"""Pascal VOC 2012 with the SBD augmentation (Hariharan et al.): 21 classes.

Training uses "train_aug": VOC 2012 train plus every SBD image (its train and val) that is not
in VOC 2012 val; 10,582 images with the full data. ``dilatedseg prepare voc`` converts SBD's
.mat labels to PNGs and writes that list; without SBD, ``train_split: train`` uses VOC alone.
"""

from __future__ import annotations

from pathlib import Path

from dilatedseg.data.base import SegmentationDataModule
from dilatedseg.viz import voc_palette

CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
PALETTE = tuple(voc_palette(len(CLASSES)))
MEAN_BGR = (102.93, 111.36, 116.52)
VOC_DIR = Path("VOCdevkit/VOC2012")
SBD_DIR = Path("benchmark_RELEASE/dataset")
LISTS = VOC_DIR / "ImageSets/Segmentation"
AUG_LABELS = VOC_DIR / "SegmentationClassAug"  # SBD labels as PNG, written by prepare


class VOCDataModule(SegmentationDataModule):
    """Pascal VOC 2012 segmentation (+ SBD); labels are VOC palette PNGs, 255 = ignore.

    Args:
        root: the folder holding VOCdevkit/ (and benchmark_RELEASE/ for SBD).
        train_split: "train_aug" (VOC train + SBD minus VOC val, the paper's) or "train".
        **kwargs: see :class:`SegmentationDataModule`.

    VOC's test labels are not public. With the test release (VOC2012test.tar, extracted into
    the same root: its JPEGs and ``ImageSets/Segmentation/test.txt``) the ``test`` split is
    those images, unlabelled: ``predict_split: test`` predicts them for the evaluation server
    and ``dilatedseg test`` stops. Without it, ``test`` is the val split.
    """

    name = "voc"
    classes = CLASSES
    palette = PALETTE
    mean_rgb = MEAN_BGR[::-1]
    source = ("http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar and "
              "SBD, http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/"
              "semantic_contours/benchmark.tgz, both extracted into the root")
    layout = """\
        VOCdevkit/VOC2012/JPEGImages/<name>.jpg
        VOCdevkit/VOC2012/SegmentationClass/<name>.png      palette PNG, values 0-20, 255 borders
        VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt
        VOCdevkit/VOC2012/ImageSets/Segmentation/test.txt   VOC2012test.tar, optional (no labels)
        benchmark_RELEASE/dataset/cls/<name>.mat            SBD (GTcls.Segmentation), optional
        benchmark_RELEASE/dataset/{train,val}.txt
        -- written by prepare:
        VOCdevkit/VOC2012/SegmentationClassAug/<name>.png   SBD labels as PNG
        VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt
    """

    def __init__(self, root: str = "data/voc", train_split: str = "train_aug", **kwargs):
        super().__init__(root=root, **kwargs)
        if train_split not in ("train_aug", "train"):
            raise ValueError(f"train_split must be 'train_aug' or 'train', got {train_split!r}")
        self.train_split = train_split

    @property
    def unlabelled_splits(self) -> tuple[str, ...]:
        """``test`` when the test release is in the root (without it, ``test`` is val)."""
        return ("test",) if (self.root / LISTS / "test.txt").is_file() else ()

    def pairs(self, split: str) -> list[tuple[Path, Path | None]]:
        voc = self.root / VOC_DIR
        if split in self.unlabelled_splits:  # VOC2012test.tar's images
            names = self.listed_names(self.root / LISTS / f"{split}.txt", "")
            return [(voc / "JPEGImages" / f"{name}.jpg", None) for name in names]
        list_name = self.train_split if split == "train" else "val" if split == "test" else split
        hint = ""
        if list_name == "train_aug":
            hint = " (SBD's list, written by prepare)"
            if not (self.root / SBD_DIR).is_dir():
                hint = (" (SBD's list, written by prepare from SBD, which is not under the root "
                        "either: download SBD into the root and prepare it, or train on VOC "
                        f"2012 train alone with {self.option_prefix}train_split=train)")
        names = self.listed_names(self.root / LISTS / f"{list_name}.txt", hint)
        pairs = []
        for name in names:  # also DeepLab's train_aug.txt of image and label paths
            label = voc / "SegmentationClass" / f"{name}.png"
            if not label.is_file() and (self.root / AUG_LABELS / f"{name}.png").is_file():
                label = self.root / AUG_LABELS / f"{name}.png"
            pairs.append((voc / "JPEGImages" / f"{name}.jpg", label))
        return pairs
