"""W&B logging, offline: the run directory holds the config, metrics, images with masks and the
IoU table; resuming a fit continues the same W&B run id in the same run directory."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli, shapes_args

from dilatedseg.loggers import configure_logger, wandb_logged_in, wandb_run_id


def wandb_args(root: Path, runs: Path, *extra: str) -> list[str]:
    """shapes_args with the default W&B logger instead of CSV."""
    args = [a for a in shapes_args(root, runs, *extra) if not a.startswith("--trainer.logger")]
    return ["fit", *args]


def run_fit(args: list[str], monkeypatch) -> None:
    """An in-process fit (WANDB_MODE=offline from conftest), its W&B run finished after."""
    import wandb

    monkeypatch.delenv("DILATEDSEG_RUN_DIR", raising=False)
    try:
        run_cli(*args)
    finally:
        wandb.finish()


def wandb_records(path: Path):
    """Records of an offline run-<id>.wandb file (W&B's LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: zero padding
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first vs middle/last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            yield record


def history_rows(path: Path) -> list[dict]:
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.fixture(scope="module")
def wandb_run(tiny_shapes, tmp_path_factory):
    """One epoch with W&B offline, then resumed for a second epoch."""
    runs = tmp_path_factory.mktemp("wandb") / "runs"
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(runs.parent)  # W&B's own debug files land here, not in the checkout
        run_fit(wandb_args(tiny_shapes, runs, "--trainer.max_epochs=1",
                           "--wandb_images.count=3"), monkeypatch)
        [run_dir] = (runs / "shapes" / "frontend").iterdir()
        first = offline_runs(run_dir)
        run_fit(wandb_args(tiny_shapes, runs, "--trainer.max_epochs=2", "--wandb_images.count=3",
                           f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"), monkeypatch)
    return run_dir, first


def test_offline_run_holds_config_metrics_images_and_table(wandb_run):
    run_dir, [first] = wandb_run
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert first.name == f"run-{run_id}.wandb"
    records = list(wandb_records(first))
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project, run.run_group) == (run_id, "dilatedseg", "shapes")
    config_keys = {item.key for r in records if r.WhichOneof("record_type") == "config"
                   for item in r.config.update}
    assert {"model", "data", "trainer", "checkpoint"} <= config_keys  # the full resolved config

    rows = history_rows(first)
    metrics = [r for r in rows if "val/mIoU" in r]
    assert len(metrics) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert metrics[0]["val/mIoU"] == pytest.approx(summary["history"][0]["val/mIoU"], abs=1e-3)
    assert {"val/IoU/background", "val/loss", "trainer/global_step"} <= set(metrics[0])

    [images] = [r for r in rows if "val/examples/count" in r]
    assert images["val/examples/count"] == 3
    masks = images["val/examples/all_masks"]
    assert len(masks) == 3 and set(masks[0]) == {"prediction", "ground_truth"}
    files = first.parent / "files"
    for mask in masks[0].values():
        assert (files / mask["path"]).is_file()

    [table_row] = [r for r in rows if "val/IoU_table/path" in r]
    step = metrics[0]["trainer/global_step"]  # all at the step of the validation's metrics
    assert images["trainer/global_step"] == table_row["trainer/global_step"] == step
    table = json.loads((files / table_row["val/IoU_table/path"]).read_text())
    assert table["columns"] == ["class", "IoU"]
    assert [row[0] for row in table["data"]] == [
        "background", "team_red", "team_green", "team_blue"]
    background = table["data"][0][1]
    assert background == pytest.approx(metrics[0]["val/IoU/background"], abs=1e-3)


def test_unreachable_wandb_server_is_one_clear_error(tiny_shapes, tmp_path, monkeypatch,
                                                    capsys):
    """Logged in on a compute node without network: wandb gives up after ~90 s with a
    CommError traceback; the run stops with one line naming WANDB_MODE=offline."""
    import functools

    import wandb
    from wandb.errors import CommError

    @functools.wraps(wandb.init)  # (the CLI reads the logger's options from its signature)
    def unreachable(*args, **kwargs):
        raise CommError("Timed out while retrying")

    monkeypatch.setattr(wandb, "init", unreachable)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        run_fit(wandb_args(tiny_shapes, tmp_path / "runs", "--trainer.max_epochs=1"),
                monkeypatch)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error: W&B server error (Timed out while retrying)" in err
    assert "export WANDB_MODE=offline" in err and "Traceback" not in err


def test_resume_continues_the_same_run(wandb_run):
    run_dir, [first] = wandb_run
    assert [p.name for p in (run_dir.parent).iterdir()] == [run_dir.name]  # no new version
    second = [p for p in offline_runs(run_dir) if p != first]
    assert len(second) == 1 and second[0].name == first.name  # same W&B run id
    epochs = [r["epoch"] for r in history_rows(second[0]) if "val/mIoU" in r]
    assert epochs == [1]  # the second part logs only the new epoch


def test_configure_logger_offline_and_agent_ids(tmp_path, monkeypatch):
    from jsonargparse import Namespace

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert not wandb_logged_in()
    logger = Namespace(class_path="lightning.pytorch.loggers.WandbLogger",
                       init_args=Namespace(offline=False))
    configure_logger(logger, tmp_path, "shapes", "context")
    args = logger.init_args
    assert args.offline is True and args.resume == "allow"
    assert args.save_dir == str(tmp_path) and args.name == f"shapes/context/{tmp_path.name}"
    assert args.id == (tmp_path / "wandb_id.txt").read_text() == wandb_run_id(tmp_path)
    # Under `wandb agent` the run id the sweep server expects wins (and is stored).
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun123")
    assert wandb_run_id(tmp_path / "other") == "agentrun123"
    assert (tmp_path / "other" / "wandb_id.txt").read_text() == "agentrun123"


def test_offline_turns_log_model_off(tmp_path, monkeypatch, capsys):
    """WandbLogger refuses log_model offline (advising offline=False): forced offline, the
    run logs no model and says so, in one line."""
    from jsonargparse import Namespace
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = Namespace(class_path="lightning.pytorch.loggers.WandbLogger",
                       init_args=Namespace(offline=False, log_model=True, project="p"))
    configure_logger(logger, tmp_path, "shapes", "context")
    assert logger.init_args.offline is True and logger.init_args.log_model is False
    assert capsys.readouterr().err.strip().splitlines() == [
        "W&B logs offline (not logged in): log_model is off, checkpoints stay in the run "
        "directory"]
    WandbLogger(**logger.init_args.as_dict())  # accepted


def test_wandb_mode_disabled_is_left_alone(tmp_path, monkeypatch):
    """offline=True would make Lightning set WANDB_MODE=dryrun over the user's 'disabled'."""
    from jsonargparse import Namespace

    monkeypatch.setenv("WANDB_MODE", "disabled")
    logger = Namespace(class_path="lightning.pytorch.loggers.WandbLogger",
                       init_args=Namespace(offline=False))
    configure_logger(logger, tmp_path, "shapes", "context")
    assert logger.init_args.offline is False


def test_only_rank_zero_stores_the_id(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    for name, value in (("RANK", "1"), ("SLURM_PROCID", "3"), ("LOCAL_RANK", "1")):
        with monkeypatch.context() as patch:
            for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
                patch.delenv(var, raising=False)
            patch.setenv(name, value)
            wandb_run_id(tmp_path / name)
        assert not (tmp_path / name / "wandb_id.txt").exists()


def test_images_callback_is_configurable():
    from dilatedseg.wandb_images import WandbImages

    assert "count: 8" in (REPO / "conf/base.yaml").read_text()
    with pytest.raises(ValueError, match="count"):
        WandbImages(count=-1)


class Source:
    """A validation dataset (name / load by index), as the feature cache's source."""

    def __len__(self) -> int:
        return 3

    def name(self, index: int) -> str:
        return f"x{index}"

    def load(self, index: int):
        return np.full((60, 50, 3), 10 * index + 5, np.uint8), None


@pytest.mark.parametrize("cached", [False, True], ids=["images", "feature-cache"])
def test_images_callback_logs_masks_and_table_on_rank_zero(cached):
    """Stub trainer / logger: what the callback hands to WandbLogger, with and without images."""
    from types import SimpleNamespace
    from unittest import mock

    import torch
    from lightning.pytorch.loggers import WandbLogger

    from dilatedseg.features import CachedLogitsDataset
    from dilatedseg.metrics import iou_from_confusion
    from dilatedseg.module import SegmentationModule
    from dilatedseg.wandb_images import WandbImages

    torch.manual_seed(0)
    module = SegmentationModule(4, ["bg", "a", "b", "c"], stage="context", arch="tiny",
                                padding="same", dilations=[1, 2, 1]).eval()
    label = torch.randint(0, 4, (3, 64, 64))
    label[:, :4] = 255
    batch = {"label": label, "name": ["x0", "x1", "x2"]}
    if cached:
        batch["frontend_logits"] = torch.randn(3, 4, 8, 8)
    else:
        batch["image"] = torch.rand(3, 3, 64, 64) * 255
    logger = mock.MagicMock(spec=WandbLogger)
    trainer = SimpleNamespace(is_global_zero=True, sanity_checking=False, loggers=[logger],
                              global_step=7,  # an earlier epoch's IoU of "a", not this one's:
                              callback_metrics={"val/IoU/a": torch.tensor(12.5)},
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
                                  _batches_that_stepped=6)))  # Lightning logs val/* at 6
    if cached:  # the images come from the dataset the validation cache was computed from
        trainer.datamodule = SimpleNamespace(datasets={"val": CachedLogitsDataset(Source())})
    callback = WandbImages(count=2)
    callback.on_validation_start(trainer, module)
    module.log = lambda *args, **kwargs: None  # no trainer to log val/loss to
    with torch.no_grad():
        outputs = module.validation_step(batch, 0)
        callback.on_validation_batch_end(trainer, module, outputs, batch, 0)
        callback.on_validation_batch_end(trainer, module, outputs, batch, 1)  # already has 2
    expected = [[name, round(iou * 100, 4) if iou == iou else None] for name, iou in zip(
        module.class_names, iou_from_confusion(module.val_confusion.compute()).tolist())]
    module.on_validation_epoch_end()  # the epoch's metrics (log_iou), then the callback's end
    callback.on_validation_end(trainer, module)

    kwargs = logger.log_image.call_args.kwargs
    assert kwargs["key"] == "val/examples" and kwargs["step"] == 6
    assert kwargs["caption"] == ["x0", "x1"] and len(kwargs["images"]) == 2
    assert kwargs["images"][0].shape == (64, 64, 3) and kwargs["images"][0].dtype.name == "uint8"
    if not cached:  # the batch's own images, as 0-255 RGB bytes
        for index in (0, 1):
            assert (kwargs["images"][index] ==
                    batch["image"][index].permute(1, 2, 0).byte().numpy()).all()
    if cached:  # image x1 (60 x 50 px) at the top left of the label's (padded) extent
        image = kwargs["images"][1]
        assert (image[:60, :50] == 15).all() and (image[60:] == 128).all()
    mask = kwargs["masks"][0]
    assert mask["ground_truth"]["mask_data"][0, 0] == 255
    assert (mask["ground_truth"]["mask_data"][4:] == label[0, 4:].numpy()).all()
    # validation_step's own predictions, image by image (not computed again, not reordered)
    for index, masks in enumerate(kwargs["masks"]):
        assert (masks["prediction"]["mask_data"] == outputs["prediction"][index].numpy()).all()
        assert (masks["ground_truth"]["mask_data"] == label[index].numpy()).all()
    assert mask["prediction"]["class_labels"] == {0: "bg", 1: "a", 2: "b", 3: "c", 255: "ignore"}
    table = logger.log_table.call_args.kwargs
    assert table["key"] == "val/IoU_table" and table["columns"] == ["class", "IoU"]
    assert table["step"] == 6
    assert table["data"] == expected and expected[1][1] != 12.5

    logger.reset_mock()  # other ranks and the sanity check log nothing
    for trainer.is_global_zero, trainer.sanity_checking in ((False, False), (True, True)):
        callback.on_validation_start(trainer, module)
        callback.on_validation_batch_end(trainer, module, outputs, batch, 0)
        callback.on_validation_end(trainer, module)
    assert not logger.log_image.called and not logger.log_table.called
