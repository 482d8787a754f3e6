"""Cityscapes: write *_gtFine_labelTrainIds.png (19 train ids, 255 = ignore) beside labelIds.

Source (free account): https://www.cityscapes-dataset.com/downloads/ (leftImg8bit_trainvaltest.zip
and gtFine_trainvaltest.zip, extracted into one folder, the ``--root``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dilatedseg.data.base import read_index_png
from dilatedseg.data.cityscapes import CityscapesDataModule, train_id_lookup


def convert_label(path: Path, table: np.ndarray) -> Path:
    """<stem>_gtFine_labelIds.png -> <stem>_gtFine_labelTrainIds.png (returns the new path)."""
    target = path.with_name(path.name.replace("_labelIds.png", "_labelTrainIds.png"))
    Image.fromarray(table[read_index_png(path)]).save(target)
    return target


def prepare_cityscapes(root: Path) -> None:
    module = CityscapesDataModule(root=str(root))
    labels = sorted((root / "gtFine").glob("*/*/*_gtFine_labelIds.png"))
    if not labels:
        raise module.missing(f"no gtFine/<split>/<city>/*_gtFine_labelIds.png under {root}")
    table = train_id_lookup()
    for path in labels:
        convert_label(path, table)
    print(f"wrote {len(labels)} *_gtFine_labelTrainIds.png files under {root / 'gtFine'}")
