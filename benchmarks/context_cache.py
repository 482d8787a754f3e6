"""Context-stage epoch time with cached front-end logits vs running the frozen front-end.

    python3 benchmarks/context_cache.py                      # shapes 128 and 256 px, tiny arch
    python3 benchmarks/context_cache.py --sizes 128 --arch vgg16 --images 16
    python3 benchmarks/context_cache.py --cityscapes 128 256 --arch tiny --images 8 --batch-size 2

Shapes case: generates a shapes dataset per image size under a temporary directory, then
trains the identity-initialised context module for ``--epochs`` epochs (no validation) both
ways, on the same front-end weights (4 classes, Dilation8-like schedule, bilinear upsampling,
Adam, float32, no dataloader workers).

Cityscapes case (:func:`run_cityscapes`, ``--cityscapes H W``): the geometry the >= 20x target
is about. A synthetic dataset in the real Cityscapes layout and formats
(``leftImg8bit/train/<city>/*_leftImg8bit.png`` RGB and ``gtFine/train/<city>/
*_gtFine_labelIds.png`` holding valid label ids, mapped to the 19 train ids as they load) at H x
W (1024x2048 on a GPU), read through :class:`~dilatedseg.data.CityscapesDataModule`, and the
Cityscapes context recipe's module, read from its files (conf/base.yaml, conf/cityscapes.yaml,
conf/stage/context.yaml, conf/cityscapes/context.yaml): VGG-16 in valid geometry, Dilation10,
the frozen deconvolution upsampling to full resolution, float32 cross-entropy on full-resolution
labels, SGD lr 1e-4 momentum 0.99, tile_size 1024 for the cache build, bf16-mixed on a GPU, the
recipe's automatic dataloader workers (pinned memory, persistent workers), whole images. Both
runs train on whole images with random mirroring (the recipe's ``crop_size: null``: the cached
run cannot crop, so the uncached one must not either, or it would do less work per image); they
differ only in where the front-end logits come from.

Per run: the one-off cache build, the epoch time of each way (the fastest epoch after the first,
which warms up: other load on the machine only ever slows an epoch down), and the speed-up.
A short epoch over-weights its start (the workers decode the first batch while the GPU waits;
over a real 2,975-image epoch that wait is paid once), so the time to the first step of that
epoch is recorded too, and the speed-up is also given without it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import recipe_model_args, sync  # noqa: E402
from PIL import Image  # noqa: E402

from dilatedseg.data import CityscapesDataModule, ShapesDataModule  # noqa: E402
from dilatedseg.data.base import read_image, read_index_png  # noqa: E402
from dilatedseg.data.cityscapes import LABELS  # noqa: E402
from dilatedseg.models.frontend import context_margin  # noqa: E402
from dilatedseg.module import SegmentationModule  # noqa: E402

CITY = "benchcity"


class Timer(L.Callback):
    """Wall time of cache preparation (on_fit_start) and of each training epoch."""

    def __init__(self):
        self.epochs: list[float] = []
        self.first_step: list[float] = []  # per epoch: seconds from its start to its first step
        self.fit_start = self.train_start = 0.0

    def setup(self, trainer, pl_module, stage):
        self.fit_start = time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self.train_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        sync(pl_module.device)
        self.epoch_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:  # the first batch is there (and on the device)
            self.first_step.append(time.perf_counter() - self.epoch_start)

    def on_train_epoch_end(self, trainer, pl_module):
        sync(pl_module.device)  # a GPU's queued kernels belong to the epoch
        self.epochs.append(time.perf_counter() - self.epoch_start)

    def steady(self) -> tuple[float, float]:
        """(epoch seconds, seconds to its first step) of the fastest epoch after the first."""
        epochs = self.epochs[1:] or self.epochs
        index = self.epochs.index(min(epochs))
        return self.epochs[index], self.first_step[index]


def fit(data, module, epochs: int, cache_dir: Path, precision: str = "32-true") -> Timer:
    """Train ``module`` on ``data`` for ``epochs`` epochs (no validation) and time it."""
    timer = Timer()
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
                        precision=precision, benchmark=False,
                        default_root_dir=str(cache_dir.parent))
    trainer.fit(module, datamodule=data)
    return timer


def train_once(root: Path, args, size: int, cached: bool, cache_dir: Path) -> Timer:
    L.seed_everything(0, verbose=False)
    data = ShapesDataModule(root=str(root), train_size=args.images, val_size=4, test_size=4,
                            image_size=size, batch_size=args.batch_size, num_workers=0)
    padding = "same" if args.arch == "tiny" else "valid"
    module = SegmentationModule(4, stage="context", arch=args.arch, padding=padding, dropout=0.0,
                                dilations=[1, 1, 2, 4, 8, 1], optimizer="adam", lr=1e-3,
                                feature_cache=cached, feature_cache_dir=str(cache_dir))
    return fit(data, module, args.epochs, cache_dir)


def result(plain: Timer, cached: Timer, **case) -> dict:
    """The figures of one case, both ways (see the module docstring)."""
    (epoch, wait), (epoch_cached, wait_cached) = plain.steady(), cached.steady()
    return {**case, "cache_build_s": cached.train_start - cached.fit_start,
            "epoch_s": epoch, "epoch_cached_s": epoch_cached,
            "speedup": epoch / epoch_cached, "first_step_s": wait,
            "first_step_cached_s": wait_cached,
            "speedup_after_first_step": (epoch - wait) / max(epoch_cached - wait_cached, 1e-9),
            "epochs_s": plain.epochs, "epochs_cached_s": cached.epochs}


def run(sizes=(128, 256), images: int = 64, batch_size: int = 16, epochs: int = 3,
        arch: str = "tiny") -> list[dict]:
    """One dict per image size: cache build (s), epoch time both ways (s), speed-up."""
    args = argparse.Namespace(images=images, batch_size=batch_size, epochs=epochs, arch=arch)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            root = Path(tmp) / f"shapes{size}"
            ShapesDataModule(root=str(root), train_size=images, val_size=4, test_size=4,
                             image_size=size).prepare_data()
            plain = train_once(root, args, size, False, Path(tmp) / f"cache{size}")
            cached = train_once(root, args, size, True, Path(tmp) / f"cache{size}")
            rows.append(result(plain, cached, size=size, images=images, batch_size=batch_size,
                               arch=arch))
    return rows


def make_cityscapes(root: Path, images: int, size: tuple[int, int], distinct: int = 4) -> dict:
    """A synthetic Cityscapes tree under ``root``: ``images`` train pairs (and one val pair,
    which the data module lists) of ``size`` (H, W), in the real layout and formats: RGB PNG
    images, 8-bit labelIds PNGs of valid Cityscapes label ids (rectangles of random ids on a
    road background, ~street-like regions). ``distinct`` scenes are generated and the rest are
    copies of them (generating and compressing a 2 Mpx scene takes ~1.5 s; a copy decodes
    the same). Returns the mean decode time of one image and one label, for the note."""
    from data import synthetic_scene  # benchmarks/data.py: compresses like a photo, not noise

    label_ids = [label_id for label_id, *_ in LABELS]
    files = []
    for split, count in (("train", images), ("val", 1)):
        for i in range(count):
            stem = f"{CITY}_{i:06d}_000019"
            image = root / "leftImg8bit" / split / CITY / f"{stem}_leftImg8bit.png"
            label = root / "gtFine" / split / CITY / f"{stem}_gtFine_labelIds.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            label.parent.mkdir(parents=True, exist_ok=True)
            if len(files) < distinct:
                picture, regions = synthetic_scene(*size, len(label_ids), seed=len(files))
                ids = np.asarray(label_ids, np.uint8)[regions]
                ids[regions == 0] = 7  # road (the scene's background), not "unlabeled"
                Image.fromarray(picture).save(image)
                Image.fromarray(ids).save(label)
            else:
                source_image, source_label = files[len(files) % distinct]
                shutil.copyfile(source_image, image)
                shutil.copyfile(source_label, label)
            files.append((image, label))
    start = time.perf_counter()
    read_image(files[0][0])
    decode = time.perf_counter() - start
    start = time.perf_counter()
    read_index_png(files[0][1])
    return {"image_decode_s": decode, "label_decode_s": time.perf_counter() - start,
            "image_kib": files[0][0].stat().st_size / 1024}


def cityscapes_once(root: Path, args, cached: bool, cache_dir: Path) -> Timer:
    """One context-stage run of the Cityscapes recipe (see the module docstring)."""
    L.seed_everything(0, verbose=False)
    recipe = recipe_model_args("cityscapes", "context", arch=args.arch,
                               class_names=list(CityscapesDataModule.classes),
                               pixel_mean=CityscapesDataModule.mean_rgb,
                               feature_cache=cached, feature_cache_dir=str(cache_dir))
    data = CityscapesDataModule(root=str(root), batch_size=args.batch_size,
                                crop_size=None,  # whole images both ways (see the docstring)
                                context_margin=context_margin(args.arch, recipe["padding"]),
                                val_batch_size=1, num_workers=args.num_workers)
    module = SegmentationModule(19, **recipe)
    return fit(data, module, args.epochs, cache_dir, args.precision)


def run_cityscapes(size: tuple[int, int] = (1024, 2048), images: int = 32, batch_size: int = 4,
                   epochs: int = 3, arch: str = "vgg16", num_workers: int | None = None,
                   precision: str | None = None) -> dict:
    """The Cityscapes-geometry case (see the module docstring): the same figures as
    :func:`run`'s, plus the synthetic files' decode times. ``num_workers`` None: the recipe's
    automatic workers (the usable cores, at most 16). ``precision`` None: bf16-mixed on a GPU,
    else 32-true."""
    if precision is None:
        precision = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    args = argparse.Namespace(images=images, batch_size=batch_size, epochs=epochs, arch=arch,
                              num_workers=num_workers, precision=precision)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cityscapes"
        files = make_cityscapes(root, images, size)
        plain = cityscapes_once(root, args, False, Path(tmp) / "cache")
        cached = cityscapes_once(root, args, True, Path(tmp) / "cache")
        workers = CityscapesDataModule(root=str(root), num_workers=num_workers).num_workers
    return result(plain, cached, size=tuple(size), images=images, batch_size=batch_size,
                  arch=arch, workers=workers, precision=precision, **files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--images", type=int, default=64, help="training images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arch", default="tiny", choices=["tiny", "vgg16"])
    parser.add_argument("--cityscapes", type=int, nargs=2, metavar=("H", "W"),
                        help="run the Cityscapes-geometry case at this image size instead")
    args = parser.parse_args()
    if args.cityscapes:
        r = run_cityscapes(tuple(args.cityscapes), args.images, args.batch_size, args.epochs,
                           args.arch)
        print({k: v for k, v in r.items()})
        return
    rows = run(args.sizes, args.images, args.batch_size, args.epochs, args.arch)
    print(f"\ncontext-stage epoch, {args.images} images, batch {args.batch_size}, arch "
          f"{args.arch}, {torch.get_num_threads()} CPU threads ({os.cpu_count()} cores)\n")
    print("| image size | cache build (once) | epoch, front-end each step | epoch, cached "
          "| speed-up |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['size']}x{row['size']} | {row['cache_build_s']:.2f} s "
              f"| {row['epoch_s']:.2f} s | {row['epoch_cached_s']:.3f} s "
              f"| {row['speedup']:.0f}x |")


if __name__ == "__main__":
    main()
