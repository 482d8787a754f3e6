"""dilatedseg: multi-scale context aggregation by dilated convolutions on PyTorch Lightning.

The public classes are importable from here (``from dilatedseg import SegmentationModule``) but
are loaded on first use, so that ``import dilatedseg.models`` needs only torch: the models never
pull in Lightning, albumentations or W&B (a bare GPU image can run them and the benchmarks).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the module that defines it.
_PUBLIC = {
    "SegmentationModule": "dilatedseg.module",
    "SegmentationDataModule": "dilatedseg.data",
    "ShapesDataModule": "dilatedseg.data",
    "VOCDataModule": "dilatedseg.data",
    "CamVidDataModule": "dilatedseg.data",
    "KITTIDataModule": "dilatedseg.data",
    "CityscapesDataModule": "dilatedseg.data",
    "FrontEnd": "dilatedseg.models",
    "ContextModule": "dilatedseg.models",
    "DenseCRF": "dilatedseg.models",
    "Segmenter": "dilatedseg.models",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dilatedseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
