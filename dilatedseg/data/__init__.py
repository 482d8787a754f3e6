"""One LightningDataModule per dataset, over the shared base in base.py."""

from dilatedseg.data.base import (
    IGNORE_INDEX,
    DataError,
    SegmentationDataModule,
    SegmentationDataset,
)
from dilatedseg.data.camvid import CamVidDataModule
from dilatedseg.data.cityscapes import CityscapesDataModule
from dilatedseg.data.kitti import KITTIDataModule
from dilatedseg.data.shapes import ShapesDataModule
from dilatedseg.data.voc import VOCDataModule

__all__ = [
    "IGNORE_INDEX",
    "CamVidDataModule",
    "CityscapesDataModule",
    "DataError",
    "KITTIDataModule",
    "SegmentationDataModule",
    "SegmentationDataset",
    "ShapesDataModule",
    "VOCDataModule",
]
