"""Context-stage epoch time with cached front-end logits vs running the frozen front-end.

    python3 benchmarks/context_cache.py                      # shapes 128 and 256 px, tiny arch
    python3 benchmarks/context_cache.py --sizes 128 --arch vgg16 --images 16

Generates a shapes dataset per image size under a temporary directory, then trains the
identity-initialised context module for ``--epochs`` epochs (no validation) both ways, on the
same front-end weights. Prints a Markdown table: the one-off cache build, the epoch time of each
way (the fastest epoch after the first, which warms up: other load on the machine only ever
slows an epoch down), and the speed-up.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from common import sync  # noqa: E402

from dilatedseg.data import ShapesDataModule  # noqa: E402
from dilatedseg.module import SegmentationModule  # noqa: E402


class Timer(L.Callback):
    """Wall time of cache preparation (on_fit_start) and of each training epoch."""

    def __init__(self):
        self.epochs: list[float] = []
        self.fit_start = self.train_start = 0.0

    def setup(self, trainer, pl_module, stage):
        self.fit_start = time.perf_counter()

    def on_train_start(self, trainer, pl_module):
        self.train_start = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module):
        sync(pl_module.device)
        self.epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        sync(pl_module.device)  # a GPU's queued kernels belong to the epoch
        self.epochs.append(time.perf_counter() - self.epoch_start)


def train_once(root: Path, args, size: int, cached: bool, cache_dir: Path) -> Timer:
    L.seed_everything(0, verbose=False)
    data = ShapesDataModule(root=str(root), train_size=args.images, val_size=4, test_size=4,
                            image_size=size, batch_size=args.batch_size, num_workers=0)
    padding = "same" if args.arch == "tiny" else "valid"
    module = SegmentationModule(4, stage="context", arch=args.arch, padding=padding, dropout=0.0,
                                dilations=[1, 1, 2, 4, 8, 1], optimizer="adam", lr=1e-3,
                                feature_cache=cached, feature_cache_dir=str(cache_dir))
    timer = Timer()
    trainer = L.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
                        default_root_dir=str(cache_dir.parent))
    trainer.fit(module, datamodule=data)
    return timer


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
            build = cached.train_start - cached.fit_start
            steady = lambda t: min(t.epochs[1:] or t.epochs)  # noqa: E731 - best of, as load varies
            rows.append({"size": size, "images": images, "batch_size": batch_size,
                         "arch": arch, "cache_build_s": build, "epoch_s": steady(plain),
                         "epoch_cached_s": steady(cached),
                         "speedup": steady(plain) / steady(cached)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--images", type=int, default=64, help="training images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arch", default="tiny", choices=["tiny", "vgg16"])
    args = parser.parse_args()
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
