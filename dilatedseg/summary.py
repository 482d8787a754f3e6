"""A run's summary.json (best val mIoU, checkpoint, time, metrics per validation): written by
:class:`RunSummary`, read back by the local sweep runner and the report, and listed per stage by
`dilatedseg summary`."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from dilatedseg.runs import (
    STAGE_ORDER,
    RunError,
    mark_interrupted,
    mark_run_started,
    run_started,
)

# `dilatedseg sweep --local` (per trial) and the report (per run) set this: rank 0 also writes
# the run's summary there.
SUMMARY_PATH_ENV = "DILATEDSEG_SUMMARY_PATH"


class RunSummary(Callback):
    """Writes summary.json (best val mIoU, checkpoint, time, metrics per validation) into the
    run directory, rank 0 only; notes when the run has got going (see
    :func:`~dilatedseg.runs.discard_unused_run_dirs`). Its history is also saved in every
    checkpoint, so that a run resumed from one has each epoch up to it once."""

    def __init__(self) -> None:
        self.checkpoint_history: list[dict] | None = None  # the resumed checkpoint's

    def state_dict(self) -> dict:
        return {"history": list(getattr(self, "history", []))}

    def load_state_dict(self, state_dict: dict) -> None:
        self.checkpoint_history = list(state_dict.get("history", []))

    def on_fit_start(self, trainer, pl_module) -> None:
        """Resuming: the run's earlier epochs, time and metrics count (also when nothing is
        left to train, as when a finished run is resumed)."""
        self.start = time.time()
        previous = Path(trainer.default_root_dir) / "summary.json"
        earlier = json.loads(previous.read_text()) if trainer.ckpt_path and \
            previous.is_file() else {}
        self.history: list[dict] = earlier.get("history", [])
        self.earlier_seconds = earlier.get("seconds") or 0.0
        self.earlier_metrics = earlier.get("metrics") or {}

    def on_train_start(self, trainer, pl_module) -> None:
        """The checkpoint is restored by now. Its own history holds every epoch up to it, also
        the last when summary.json missed it (the task was killed after the checkpoint was
        saved, before the summary's next write); summary.json's counts for checkpoints saved
        without one. Epochs from the resumed one on are run again."""
        if self.checkpoint_history is not None:
            self.history, self.checkpoint_history = self.checkpoint_history, None
        self.history = [row for row in self.history
                        if row.get("epoch", 0) < trainer.current_epoch]

    def mark_started(self, trainer, *args) -> None:
        if not trainer.sanity_checking:
            mark_run_started()

    on_train_batch_end = on_validation_batch_end = mark_started
    on_test_batch_end = on_predict_batch_end = mark_started

    def on_validation_end(self, trainer, pl_module) -> None:
        # Here (unlike in on_validation_epoch_end) callback_metrics hold this epoch's values.
        if trainer.sanity_checking or not hasattr(self, "history"):
            return
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        row.update(scalar_metrics(trainer.callback_metrics))
        self.history.append(row)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # The previous epoch's validation and checkpoint are final now (ModelCheckpoint saves
        # at the end of the epoch, after this callback's hooks): an interrupted run keeps its
        # history so far.
        if getattr(self, "history", None):
            self.write(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        mark_interrupted(isinstance(exception, KeyboardInterrupt))
        if getattr(self, "history", None) and run_started():  # not a start that failed
            self.write(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.write(trainer, pl_module)

    def write(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        score = checkpoint.best_model_score if checkpoint is not None else None
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        summary = {
            "dataset": trainer.datamodule.name if trainer.datamodule is not None else None,
            "stage": pl_module.hparams.get("stage"),
            "run": str(run_dir),
            "best_val_mIoU": None if score is None else round(float(score), 4),
            "best_checkpoint": checkpoint.best_model_path if checkpoint is not None else None,
            "epochs": trainer.current_epoch,
            "seconds": round(self.earlier_seconds + time.time() - self.start, 1),
            "metrics": scalar_metrics(trainer.callback_metrics) or self.earlier_metrics,
            "history": self.history,
        }
        text = json.dumps(summary, indent=2) + "\n"
        write_atomically(run_dir / "summary.json", text)
        if os.environ.get(SUMMARY_PATH_ENV):
            write_atomically(Path(os.environ[SUMMARY_PATH_ENV]), text)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed over it: a task killed while
    it writes leaves the previous file whole, never half of one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """Logged metrics as plain floats (one-element tensors and numbers)."""
    out = {}
    for name, value in metrics.items():
        try:
            out[name] = round(float(value), 6)
        except (TypeError, ValueError, RuntimeError):
            continue
    return out


def latest_summaries(runs_dir: str, dataset: str) -> list[dict]:
    """The newest summary.json of each stage of a dataset, in stage order."""
    rows = []
    for stage in STAGE_ORDER:
        found = sorted((Path(runs_dir) / dataset / stage).glob("*/summary.json"),
                       key=lambda p: p.stat().st_mtime)
        if found:
            rows.append(json.loads(found[-1].read_text()))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| stage | val mIoU | epochs | time (s) | run |", "|---|---|---|---|---|"]
    for row in rows:
        miou = "-" if row["best_val_mIoU"] is None else f"{row['best_val_mIoU']:.1f}"
        lines.append(f"| {row['stage']} | {miou} | {row['epochs']} | {row['seconds']} |"
                     f" {row['run']} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="dilatedseg summary", usage="%(prog)s [--dataset D] [--runs_dir R] [-- FIT ARGS]",
        description="Validation mIoU of the latest run of each stage. After --, the arguments "
                    "of a `dilatedseg fit` (configs and options, as make train passes them): "
                    "the runs directory is the one that command writes to.")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--runs_dir", default="runs")
    split = argv.index("--") if "--" in argv else len(argv)
    args, fit_args = parser.parse_args(argv[:split]), argv[split + 1:]
    if fit_args:
        from dilatedseg.sweep import parse_trial

        args.runs_dir = parse_trial(["dilatedseg", "fit", *fit_args]).get("runs_dir", "runs")
    rows = latest_summaries(args.runs_dir, args.dataset)
    if not rows:
        raise RunError(f"no finished runs under {args.runs_dir}/{args.dataset}/; "
                       f"run: make train DATASET={args.dataset}")
    print(f"Validation mIoU per stage ({args.dataset}):\n{format_table(rows)}")
