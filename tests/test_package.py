"""The package's import surface: public names, and models that need torch alone."""

import os
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


def test_cli_shortens_openmp_spinning_before_torch_loads():
    """libgomp reads GOMP_SPINCOUNT once, as torch loads it: the CLI sets it (unless the user
    chose a spin count or wait policy) before its first import of torch."""
    code = """if True:
        import os, sys
        seen = []
        class Watch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" and not seen:
                    seen.append(os.environ.get("GOMP_SPINCOUNT"))
        sys.meta_path.insert(0, Watch())
        import dilatedseg.cli
        print(seen[0])"""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env=env).stdout.strip()
    assert out == "3000"
