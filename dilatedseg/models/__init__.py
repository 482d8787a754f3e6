"""Plain nn.Modules: no Lightning here."""

from dilatedseg.models.context import SCHEDULES, ContextModule
from dilatedseg.models.crf import DenseCRF
from dilatedseg.models.frontend import FrontEnd
from dilatedseg.models.segmenter import Segmenter
from dilatedseg.models.weights import load_vgg16_imagenet

__all__ = ["FrontEnd", "ContextModule", "DenseCRF", "Segmenter", "SCHEDULES",
           "load_vgg16_imagenet"]
