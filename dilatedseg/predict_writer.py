"""Writes `dilatedseg predict` results to disk as they come (nothing is kept in memory).

For each image ``<name>``, under the output folder:

    index/<name>.png     class indices (a palette PNG: the values are the class ids)
    colour/<name>.png    the prediction in the dataset's colours (RGB)
    overlay/<name>.jpg   the colours blended over the image
    labelIds/<name>.png  only for datasets with ``submission_ids`` (Cityscapes, KITTI
                         semantics): label ids in the official format, for the server

Encoding three or four image files per prediction costs far more than a GPU takes to predict
it (PNG compression of a 2 Mpx Cityscapes image: tens of ms), so the files are written by a few
background threads (zlib and JPEG encoding release the GIL) while the next batches are
predicted; at most a few batches wait to be written, and the first failed write stops predict.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from dilatedseg import viz

# The folders a prediction's files go to (labelIds/ only for datasets with submission ids).
FOLDERS = ("index", "colour", "overlay", "labelIds")


def earlier_predictions(output_dir: str | Path) -> list[Path]:
    """The prediction folders under ``output_dir`` that already hold files (an earlier
    predict's): predicting into them would overwrite some and mix in the rest."""
    folders = [Path(output_dir) / folder for folder in FOLDERS]
    return [folder for folder in folders if folder.is_dir() and any(folder.iterdir())]


class PredictionWriter(BasePredictionWriter):
    """Lightning callback writing each predicted batch (see the module docstring)."""

    def __init__(self, output_dir: str | Path, overlay_alpha: float = 0.5):
        super().__init__(write_interval="batch")
        self.output_dir, self.overlay_alpha = Path(output_dir), overlay_alpha

    def setup(self, trainer, pl_module, stage: str) -> None:
        # One folder for every process: rank 0's (a node started by hand does not know the
        # run directory rank 0 made).
        self.output_dir = Path(trainer.strategy.broadcast(str(self.output_dir)))

    def on_predict_start(self, trainer, pl_module) -> None:
        self.written = 0
        self.threads = min(8, os.cpu_count() or 1)
        self.writers = ThreadPoolExecutor(self.threads, thread_name_prefix="predict-writer")
        self.pending: list[Future] = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch,
                           batch_idx, dataloader_idx) -> None:
        datamodule = trainer.datamodule
        palette = getattr(datamodule, "palette", None) or viz.voc_palette()
        submission = getattr(datamodule, "submission_ids", None)
        images = batch["image"].permute(0, 2, 3, 1).clamp(0, 255).byte().cpu().numpy()
        labels = prediction["prediction"].cpu().numpy().astype(np.uint8)
        for name, image, label in zip(prediction["name"], images, labels):
            self.pending.append(self.writers.submit(self.write, name, image, label, palette,
                                                    submission))
        for write in [write for write in self.pending if write.done()]:  # a failure stops now
            self.pending.remove(write)
            self.finish(write)
        while len(self.pending) > 4 * self.threads:  # bounded: images wait in memory
            self.finish(self.pending.pop(0))

    def write(self, name: str, image: np.ndarray, label: np.ndarray, palette, submission
              ) -> None:
        """The files of one prediction (on a writer thread)."""
        viz.palette_png(label, palette).save(self.path("index", f"{name}.png"))
        Image.fromarray(viz.colourise(label, palette)).save(self.path("colour", f"{name}.png"))
        Image.fromarray(viz.overlay(image, label, palette, self.overlay_alpha)).save(
            self.path("overlay", f"{name}.jpg"), quality=90)
        if submission is not None:
            Image.fromarray(submission[label]).save(self.path("labelIds", f"{name}.png"))

    def finish(self, write: Future) -> None:
        write.result()  # a failed write raises here, in the predicting thread
        self.written += 1

    def path(self, folder: str, file: str) -> Path:
        """output/<folder>/<file>, its folders made (a name may hold sub-folders)."""
        path = self.output_dir / folder / file
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def on_predict_end(self, trainer, pl_module) -> None:
        for write in self.pending:
            self.finish(write)
        self.writers.shutdown()
        # Each process writes its share of the images: the total is the sum over processes.
        written = int(trainer.strategy.reduce(torch.tensor(self.written, device=pl_module.device),
                                              reduce_op="sum"))
        if trainer.is_global_zero:
            print(f"wrote {written} predictions to {self.output_dir}")

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        writers = getattr(self, "writers", None)
        if writers is not None:  # what was predicted is still written
            writers.shutdown(wait=True)
