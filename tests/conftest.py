"""Shared fixtures: offline W&B, a tiny shapes dataset, and an in-process CLI runner."""

from __future__ import annotations

import os

os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch):
    """Each test starts without a run directory inherited from an earlier in-process run."""
    monkeypatch.delenv("DILATEDSEG_RUN_DIR", raising=False)


@pytest.fixture
def one_thread():
    """One torch thread: for tiny sparse products, MKL's thread start-up dominates (badly so
    on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A small shapes dataset on disk (32 train, 8 val, 8 test images)."""
    from dilatedseg.data import ShapesDataModule

    root = tmp_path_factory.mktemp("shapes")
    ShapesDataModule(root=str(root), train_size=32, val_size=8, test_size=8).prepare_data()
    return root


def shapes_args(root: Path, runs: Path, *extra: str) -> list[str]:
    """CLI arguments for a fast CPU run on the tiny shapes dataset, CSV logging, no workers."""
    return [
        "--config", str(REPO / "conf/shapes.yaml"),
        *extra,
        f"--runs_dir={runs}",
        f"--data.init_args.root={root}",
        "--data.init_args.train_size=32", "--data.init_args.val_size=8",
        "--data.init_args.test_size=8", "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=8", "--data.init_args.val_batch_size=4",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir=unused",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
    ]


def run_cli(*argv: str) -> None:
    """Run `dilatedseg ...` in this process."""
    from dilatedseg.cli import main

    main(list(argv))


def untrained_checkpoint(path: Path, num_classes: int, **module_args) -> Path:
    """A checkpoint of a freshly initialised tiny module, for evaluation commands that only
    need some weights (pass it as --model.init_from)."""
    import torch

    from dilatedseg.module import SegmentationModule

    module = SegmentationModule(num_classes, arch="tiny", **module_args)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)},
               path)
    return path
