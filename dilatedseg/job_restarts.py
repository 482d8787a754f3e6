"""A callback that keeps a run directory in order for the restarts of its SLURM / torchrun job:
which start of the job took the directory up, and no hpc checkpoint that the fit went past."""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from dilatedseg.runs import (
    file_version,
    last_checkpoint,
    mark_job_start,
    superseded_hpc_checkpoints,
)


class JobRestarts(Callback):
    """Rank 0 notes this start of the job in the run directory (job_start.txt, see
    :func:`~dilatedseg.runs.job_run_dir`) and, once the fit has saved a newer
    checkpoints/last.ckpt, deletes the hpc checkpoints it resumed past (see
    :func:`~dilatedseg.runs.superseded_hpc_checkpoints`)."""

    def __init__(self) -> None:
        self.superseded: list[Path] = []
        self.last_at_start: tuple | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        """Every process has chosen the run directory by now (they all joined)."""
        if trainer.is_global_zero:
            mark_job_start(Path(trainer.default_root_dir))

    def on_fit_start(self, trainer, pl_module) -> None:
        """Every process has read the checkpoint it resumes from by now."""
        if trainer.is_global_zero:
            run_dir = Path(trainer.default_root_dir)
            self.superseded = superseded_hpc_checkpoints(run_dir, trainer.ckpt_path)
            self.last_at_start = file_version(last_checkpoint(run_dir))

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # The previous epoch's checkpoints are complete now (saved at its end).
        self.discard_superseded(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.discard_superseded(trainer)

    def discard_superseded(self, trainer) -> None:
        """Delete the hpc checkpoints this fit resumed past, once it has saved last.ckpt."""
        last = last_checkpoint(Path(trainer.default_root_dir))
        if not self.superseded or file_version(last) in (None, self.last_at_start):
            return
        for path in self.superseded:
            path.unlink(missing_ok=True)
        print(f"deleted {', '.join(path.name for path in self.superseded)} from "
              f"{trainer.default_root_dir}: {last} is newer", file=sys.stderr)
        self.superseded = []
