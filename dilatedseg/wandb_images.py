"""W&B validation media: a fixed set of images with predicted and ground-truth masks, and a
per-class IoU table, logged after every validation run.

The CLI adds this callback (configured under ``wandb_images`` in conf/base.yaml, e.g.
``--wandb_images.count=4``; ``count: 0`` turns the images off). It does nothing unless the trainer
has a WandbLogger, and works on global rank 0 only: the images are the first ``count`` of rank
0's share of the validation set, the same ones every epoch (validation is not shuffled), with
the predictions ``validation_step`` returns (nothing is computed again). Class names come from
``pl_module.class_names``, which the CLI links from the data module. With the context stage's
feature cache, batches carry logits, not images: the images are read by name from the
validation dataset the cache was computed from (a grey canvas where there is none).
"""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from dilatedseg.labels import IGNORE_INDEX


class WandbImages(Callback):
    """Logs validation images, masks and a per-class IoU table to W&B.

    Args:
        count: validation images to log each validation run (0: none).
        key: history key of the images; the table (of ``val/IoU/<class>``) goes to
            ``val/IoU_table``.
        table: whether to log the per-class IoU table.
    """

    def __init__(self, count: int = 8, key: str = "val/examples", table: bool = True):
        if count < 0:
            raise ValueError(f"wandb_images.count must be >= 0, got {count}")
        self.count, self.key, self.table = count, key, table
        self.samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]] = []

    @staticmethod
    def wandb_logger(trainer) -> WandbLogger | None:
        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def active(self, trainer) -> bool:
        return (trainer.is_global_zero and not trainer.sanity_checking
                and self.wandb_logger(trainer) is not None)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.samples = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx: int = 0) -> None:
        wanted = self.count - len(self.samples)
        if wanted <= 0 or not self.active(trainer):
            return
        batch = {k: v[:wanted] if isinstance(v, torch.Tensor | list) else v
                 for k, v in batch.items()}
        prediction = outputs["prediction"][:wanted]  # validation_step's, not computed again
        labels = batch["label"].cpu().numpy().astype(np.uint8)
        names = batch.get("name") or [str(len(self.samples) + i) for i in range(len(labels))]
        if "image" in batch:
            images = batch["image"].permute(0, 2, 3, 1).clamp(0, 255).byte().cpu().numpy()
        else:
            images = cached_images(trainer, names, labels.shape)
        for image, label, pred, name in zip(images, labels, prediction.cpu().numpy(), names):
            self.samples.append((image, pred.astype(np.uint8), label, str(name)))

    def on_validation_end(self, trainer, pl_module) -> None:
        # After the epoch's metrics are computed: pl_module.class_iou holds this epoch's IoUs.
        if not self.active(trainer):
            return
        logger = self.wandb_logger(trainer)
        # The step Lightning logs val/mIoU & co. at. No public value equals it: during a
        # validation inside fit, trainer.global_step already counts the batch's optimiser step
        # (one ahead), and equals it only when the validation falls on an accumulating batch.
        # Lightning's own LearningRateMonitor and DeviceStatsMonitor read this counter too.
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        class_labels = dict(enumerate(pl_module.class_names))
        class_labels[IGNORE_INDEX] = "ignore"
        if self.samples:
            logger.log_image(
                key=self.key,
                images=[image for image, *_ in self.samples],
                step=step,
                caption=[name for *_, name in self.samples],
                masks=[{"prediction": {"mask_data": pred, "class_labels": class_labels},
                        "ground_truth": {"mask_data": label, "class_labels": class_labels}}
                       for _, pred, label, _ in self.samples],
            )
        if self.table:
            ious = getattr(pl_module, "class_iou", {}).get("val", [])
            rows = [[name, round(iou, 4) if iou == iou else None]  # (NaN: absent)
                    for name, iou in zip(pl_module.class_names, ious)]
            logger.log_table(key="val/IoU_table", columns=["class", "IoU"], data=rows,
                             step=step)
        self.samples = []


def cached_images(trainer, names: list[str], shape: tuple[int, ...]) -> np.ndarray:
    """The images of a feature-cache batch (logits, no images), read by name from the dataset
    the validation cache was computed from, at the top left of the (padded) label's shape;
    a grey canvas where there is none."""
    images = np.full((*shape, 3), 128, np.uint8)
    datasets = getattr(getattr(trainer, "datamodule", None), "datasets", None) or {}
    source = getattr(datasets.get("val"), "source", None)
    if source is None:
        return images
    index = {source.name(i): i for i in range(len(source))}
    for canvas, name in zip(images, names):
        if name in index:
            image = source.load(index[name])[0]
            canvas[:image.shape[0], :image.shape[1]] = image[:canvas.shape[0], :canvas.shape[1]]
    return images
