"""Pascal VOC 2012 + SBD: SBD .mat labels -> PNG, and the train_aug list.

Sources (download and extract into one folder, the ``--root``):
  VOC 2012: http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar
  SBD:      http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/benchmark.tgz
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import scipy.io

from dilatedseg.data.base import DataError
from dilatedseg.data.voc import AUG_LABELS, LISTS, PALETTE, SBD_DIR, VOC_DIR, VOCDataModule
from dilatedseg.viz import palette_png


def read_sbd_mat(path: Path) -> np.ndarray:
    """SBD class label (GTcls.Segmentation of a cls/*.mat file) -> (H, W) uint8."""
    try:
        mat = scipy.io.loadmat(path, struct_as_record=True)
        return np.asarray(mat["GTcls"]["Segmentation"][0, 0], dtype=np.uint8)
    except (OSError, ValueError, KeyError, IndexError, NotImplementedError,
            scipy.io.matlab.MatReadError) as error:  # NotImplementedError: MATLAB v7.3 (HDF5)
        raise DataError(f"cannot read SBD label {path}: {error!r}; expected a .mat file with "
                        "the struct GTcls.Segmentation") from None


def read_list(path: Path) -> list[str]:
    return path.read_text().split() if path.is_file() else []


def convert_sbd(root: Path) -> list[str]:
    """Write every SBD label as a VOC palette PNG; copy images VOC lacks. Returns the names."""
    sbd, voc = root / SBD_DIR, root / VOC_DIR
    out = root / AUG_LABELS
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for mat in sorted((sbd / "cls").glob("*.mat")):
        target = out / f"{mat.stem}.png"
        if not target.is_file():  # written whole, then renamed: a stopped run leaves no stub
            partial = target.with_suffix(".partial.png")
            palette_png(read_sbd_mat(mat), PALETTE).save(partial)
            partial.replace(target)
        image = voc / "JPEGImages" / f"{mat.stem}.jpg"
        if not image.is_file() and (sbd / "img" / image.name).is_file():
            shutil.copy(sbd / "img" / image.name, image)
        names.append(mat.stem)
    return names


def train_aug_names(root: Path) -> list[str]:
    """VOC train + SBD train + SBD val, minus VOC val (10,582 names with the full data)."""
    voc_val = set(read_list(root / LISTS / "val.txt"))
    names = set(read_list(root / LISTS / "train.txt"))
    for sbd_split in ("train", "val"):
        names |= set(read_list(root / SBD_DIR / f"{sbd_split}.txt"))
    return sorted(names - voc_val)


def prepare_voc(root: Path) -> None:
    """Convert SBD and write train_aug.txt; without SBD, a train_aug.txt already there (with
    its labels, as DeepLab's SegmentationClassAug) is kept, to be checked."""
    module = VOCDataModule(root=str(root))
    train_aug = root / LISTS / "train_aug.txt"
    without_sbd = not (root / SBD_DIR).is_dir()
    for needed in (root / VOC_DIR / "JPEGImages", root / LISTS / "train.txt",
                   root / LISTS / "val.txt", root / SBD_DIR / "cls",
                   root / SBD_DIR / "train.txt", root / SBD_DIR / "val.txt"):
        if without_sbd and train_aug.is_file() and needed.is_relative_to(root / SBD_DIR):
            continue
        if not needed.exists():
            alone = ("; without SBD, train on VOC 2012 train alone with --data.init_args."
                     "train_split=train, which needs no prepare"
                     if needed.is_relative_to(root / SBD_DIR) else "")
            raise module.missing(f"{needed} is missing (download VOC 2012 and SBD, see "
                                 f"`dilatedseg prepare voc --help`{alone})")
    if without_sbd and train_aug.is_file():
        print(f"no SBD under {root}: {train_aug} is kept as it is, with the labels it names")
        return
    converted = convert_sbd(root)
    names = train_aug_names(root)
    (root / LISTS / "train_aug.txt").write_text("\n".join(names) + "\n")
    print(f"converted {len(converted)} SBD labels to {root / AUG_LABELS}; "
          f"train_aug: {len(names)} images, val: {len(read_list(root / LISTS / 'val.txt'))}")
