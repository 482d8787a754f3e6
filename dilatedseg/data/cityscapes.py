"""Cityscapes (fine annotations): 2,975 train / 500 val / 1,525 test, 19 evaluated classes.

The gtFine ``*_labelIds.png`` files hold the 34 label ids; training and evaluation use the 19
train ids (everything else -> 255). ``dilatedseg prepare cityscapes`` writes
``*_gtFine_labelTrainIds.png`` beside them once; without them, ids are mapped on the fly.
Predictions are written back as label ids (``submission_ids``) for the official server.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dilatedseg.data.base import DataError, SegmentationDataModule, read_index_png

# (label id, name, train id or 255, category) for the 34 labelIds of Cityscapes.
LABELS = (
    (0, "unlabeled", 255, "void"), (1, "ego vehicle", 255, "void"),
    (2, "rectification border", 255, "void"), (3, "out of roi", 255, "void"),
    (4, "static", 255, "void"), (5, "dynamic", 255, "void"), (6, "ground", 255, "void"),
    (7, "road", 0, "flat"), (8, "sidewalk", 1, "flat"), (9, "parking", 255, "flat"),
    (10, "rail track", 255, "flat"), (11, "building", 2, "construction"),
    (12, "wall", 3, "construction"), (13, "fence", 4, "construction"),
    (14, "guard rail", 255, "construction"), (15, "bridge", 255, "construction"),
    (16, "tunnel", 255, "construction"), (17, "pole", 5, "object"),
    (18, "polegroup", 255, "object"), (19, "traffic light", 6, "object"),
    (20, "traffic sign", 7, "object"), (21, "vegetation", 8, "nature"),
    (22, "terrain", 9, "nature"), (23, "sky", 10, "sky"), (24, "person", 11, "human"),
    (25, "rider", 12, "human"), (26, "car", 13, "vehicle"), (27, "truck", 14, "vehicle"),
    (28, "bus", 15, "vehicle"), (29, "caravan", 255, "vehicle"),
    (30, "trailer", 255, "vehicle"), (31, "train", 16, "vehicle"),
    (32, "motorcycle", 17, "vehicle"), (33, "bicycle", 18, "vehicle"),
)
TRAIN_LABELS = sorted((t, name, category) for _, name, t, category in LABELS if t != 255)
CLASSES = tuple(name for _, name, _ in TRAIN_LABELS)
CATEGORIES = tuple(category for _, _, category in TRAIN_LABELS)
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
MEAN_BGR = (72.39, 82.91, 73.16)

def train_id_lookup() -> np.ndarray:
    """256-entry table: label id -> train id (255 for unevaluated ids).

    Values beyond the 34 ids map to themselves, so the label check names the file.
    """
    table = np.arange(256, dtype=np.uint8)
    for label_id, _, train_id, _ in LABELS:
        table[label_id] = train_id
    return table

def label_id_lookup() -> np.ndarray:
    """256-entry table: train id -> label id, for writing predictions in the server's format."""
    table = np.zeros(256, np.uint8)
    for label_id, _, train_id, _ in LABELS:
        if train_id != 255:
            table[train_id] = label_id
    return table

class CityscapesDataModule(SegmentationDataModule):
    """Cityscapes fine: 19 classes, 7 categories (for category IoU), 255 = ignore.

    Args:
        root: the folder holding leftImg8bit/ and gtFine/.
        **kwargs: see :class:`SegmentationDataModule`.

    The test split's labels are not public: ``dilatedseg test`` stops; use
    ``dilatedseg predict`` with ``predict_split: test`` and upload the ``labelIds`` folder.
    """

    name = "cityscapes"
    classes = CLASSES
    categories = CATEGORIES
    palette = PALETTE
    mean_rgb = MEAN_BGR[::-1]
    unlabelled_splits = ("test",)
    source = ("https://www.cityscapes-dataset.com/downloads/ (free account): "
              "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip, extracted into the root")
    layout = """\
        leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
        gtFine/{train,val}/<city>/<city>_<seq>_<frame>_gtFine_labelTrainIds.png  (prepare)
    """

    def __init__(self, root: str = "data/cityscapes", **kwargs):
        super().__init__(root=root, **kwargs)
        self.train_ids = train_id_lookup()
        self.submission_ids = label_id_lookup()

    def extracted_apart(self) -> str | None:
        """The problem and the fix when leftImg8bit/ and gtFine/ lie in different folders
        (each zip extracted into a folder of its own, as leftImg8bit_trainvaltest/leftImg8bit/
        and gtFine_trainvaltest/gtFine/, in the root, or beside it when the root is one of
        them); None otherwise."""
        images, labels = (next((path for path in (
            self.root / name, *sorted(self.root.glob(f"*/{name}")),
            *sorted(self.root.parent.glob(f"*_trainvaltest/{name}"))) if path.is_dir()), None)
            for name in ("leftImg8bit", "gtFine"))
        if images is None or labels is None or images.parent == labels.parent:
            return None
        move = " ".join(str(path) for path in (images, labels) if path.parent != self.root)
        return (f"cityscapes: leftImg8bit/ lies in {images.parent}, gtFine/ in {labels.parent} "
                "(each zip extracted into a folder of its own); the root must hold both: "
                f"`mv {move} {self.root}/`")

    def pairs(self, split: str) -> list[tuple[Path, Path | None]]:
        unlabelled = split in self.unlabelled_splits
        if not unlabelled and (problem := self.extracted_apart()):
            raise DataError(problem)
        pairs = []
        for image in self.images_in(self.root / "leftImg8bit" / split, "*/*_leftImg8bit.png"):
            if unlabelled:
                pairs.append((image, None))
                continue
            stem = image.name[: -len("_leftImg8bit.png")]
            gt = self.root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_"
            label_ids, train_ids = Path(f"{gt}labelIds.png"), Path(f"{gt}labelTrainIds.png")
            # Scored splits read labelIds, as the official evaluation does (a labelTrainIds
            # file from elsewhere, e.g. resampled, may not agree with it); training takes the
            # prepared train ids when they are there.
            use_train_ids = train_ids.is_file() and (split == "train" or not label_ids.is_file())
            pairs.append((image, train_ids if use_train_ids else label_ids))
        return pairs

    def read_label(self, path: Path) -> np.ndarray:
        label = read_index_png(path)
        if path.name.endswith("_labelTrainIds.png"):
            return label
        return self.train_ids[label]
