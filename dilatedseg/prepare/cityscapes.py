"""Cityscapes: write *_gtFine_labelTrainIds.png (19 train ids, 255 = ignore) beside labelIds.

Source (free account): https://www.cityscapes-dataset.com/downloads/ (leftImg8bit_trainvaltest.zip
and gtFine_trainvaltest.zip, extracted into one folder, the ``--root``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dilatedseg.data.base import DataError, label_values, read_index_png
from dilatedseg.data.cityscapes import LABELS, CityscapesDataModule, train_id_lookup
from dilatedseg.labels import IGNORE_INDEX


def convert_label(path: Path, table: np.ndarray) -> Path:
    """<stem>_gtFine_labelIds.png -> <stem>_gtFine_labelTrainIds.png (returns the new path).
    A label id Cityscapes does not define stops here, naming this file, not the output."""
    label = read_index_png(path)
    defined = {label_id for label_id, *_ in LABELS} | {IGNORE_INDEX}
    undefined = sorted(set(label_values(label).tolist()) - defined)
    if undefined:
        raise DataError(f"{path} holds label ids {undefined} that Cityscapes does not define "
                        f"(0-{max(defined - {IGNORE_INDEX})}): the file is damaged or not a "
                        "gtFine *_labelIds.png; extract it again from gtFine_trainvaltest.zip")
    target = path.with_name(path.name.replace("_labelIds.png", "_labelTrainIds.png"))
    Image.fromarray(table[label]).save(target)
    return target


def prepare_cityscapes(root: Path) -> None:
    module = CityscapesDataModule(root=str(root))
    if problem := module.extracted_apart():
        raise DataError(problem)
    labels = sorted((root / "gtFine").glob("*/*/*_gtFine_labelIds.png"))
    if not labels:
        raise module.missing(f"no gtFine/<split>/<city>/*_gtFine_labelIds.png under {root}")
    table = train_id_lookup()
    for path in labels:
        convert_label(path, table)
    print(f"wrote {len(labels)} *_gtFine_labelTrainIds.png files under {root / 'gtFine'}")
