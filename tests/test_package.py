"""The package's import surface: public names, and models that need torch alone."""

import subprocess
import sys

import pytest

import dilatedseg

HEAVY = ("lightning", "albumentations", "wandb", "omegaconf", "jsonargparse", "torchmetrics")


def test_public_names_resolve_to_their_classes():
    from dilatedseg.data import CityscapesDataModule
    from dilatedseg.models import Segmenter
    from dilatedseg.module import SegmentationModule

    assert dilatedseg.SegmentationModule is SegmentationModule
    assert dilatedseg.CityscapesDataModule is CityscapesDataModule
    assert dilatedseg.Segmenter is Segmenter
    for name in dilatedseg.__all__:
        assert getattr(dilatedseg, name).__name__ == name
    assert set(dilatedseg.__all__) <= set(dir(dilatedseg))


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="NoSuchThing"):
        dilatedseg.NoSuchThing  # noqa: B018


def test_models_flops_and_inference_import_without_lightning_or_data_stack():
    # A fresh interpreter: this test process has long imported everything.
    code = ("import sys, dilatedseg.models, dilatedseg.flops, dilatedseg.inference; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "", f"importing the models loaded {loaded}"
