"""dilatedseg: multi-scale context aggregation by dilated convolutions on PyTorch Lightning."""

from dilatedseg.data import (
    CamVidDataModule,
    CityscapesDataModule,
    KITTIDataModule,
    SegmentationDataModule,
    ShapesDataModule,
    VOCDataModule,
)
from dilatedseg.models import ContextModule, DenseCRF, FrontEnd, Segmenter
from dilatedseg.module import SegmentationModule

__version__ = "0.1.0"
__all__ = [
    "SegmentationModule",
    "SegmentationDataModule",
    "ShapesDataModule",
    "VOCDataModule",
    "CamVidDataModule",
    "KITTIDataModule",
    "CityscapesDataModule",
    "FrontEnd",
    "ContextModule",
    "DenseCRF",
    "Segmenter",
]
