"""Cached front-end logits for the context stage, as the authors trained it.

In the context stage the front-end is frozen, so its logits for a given image never change.
:class:`FrontendLogitsCache` (a Lightning callback the module adds when
``--model.feature_cache=true``) computes them once per split, writes them to disk and swaps the
data module's train / val datasets for :class:`CachedLogitsDataset`, whose batches carry
``frontend_logits`` instead of ``image``; the module then runs only the context module,
upsampling and loss.

On disk, ``<runs>/<dataset>/cache/<split>-<key>/`` holds ``logits.bin`` (float32, C x h x w per
image, back to back), ``labels.bin`` (uint8 full-resolution labels) and ``index.json`` (names,
shapes, offsets); both .bin files are read memory-mapped. ``key`` hashes the front-end's
weights and input normalisation, the data module's class, every file's path / size / mtime and
the first image's size, so a new front-end checkpoint or changed data gives a new directory (old
ones can be deleted freely). A cache is written to a temporary directory and renamed when
complete, so an interrupted build is never used. Under DDP global rank 0 builds it (and names
the directory: its key) while the other processes wait; on several nodes they read it through a
shared filesystem.

Augmentation: the cache holds whole, un-augmented images, so random crops and scaling are not
available (``crop_size`` and ``crops_per_image`` are ignored: training is on whole images, as
the authors' Cityscapes context stage). Random horizontal mirroring is kept, applied to the
logits and the label together, about the logits' extent (8 px per logit: when the width is not
a multiple of 8 the mirrored label gains 255 columns on the left); it equals mirroring the image
up to the front-end's own left-right asymmetry.
Images of different sizes are zero-padded (logits) / 255-padded (labels) at the bottom and
right to the split's largest size, so they batch; items then carry their own ``logits_size``, and
the module runs each size's items at that size (so padding never reaches the context module
or the upsampling: the same result as one image at a time). A run limited to a number of batches
(``limit_train_batches: 4``, ``fast_dev_run``) caches only the first items it can read, not the
whole split.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from dilatedseg.labels import IGNORE_INDEX
from dilatedseg.models.frontend import OUTPUT_STRIDE
from dilatedseg.runs import RunError

CACHE_VERSION = 1


def _hash_tensor(hasher, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    hasher.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    hasher.update(tensor.view(-1).view(torch.uint8).numpy())


def cache_key(segmenter, dataset, datamodule_class: str = "") -> str:
    """Hash of everything the cached logits depend on (see the module docstring)."""
    hasher = hashlib.sha256(f"v{CACHE_VERSION} {datamodule_class}".encode())
    frontend = segmenter.frontend
    hasher.update(f"{getattr(frontend, 'arch', '')} {getattr(frontend, 'padding', '')}".encode())
    for name, tensor in sorted(frontend.state_dict().items()):
        hasher.update(name.encode())
        _hash_tensor(hasher, tensor)
    _hash_tensor(hasher, segmenter.pixel_mean)
    _hash_tensor(hasher, segmenter.pixel_std)
    for pair in dataset.pairs:
        for path in pair:
            if path is not None:
                stat = Path(path).stat()
                hasher.update(f"{path} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    if len(dataset):
        hasher.update(str(tuple(dataset[0]["image"].shape)).encode())  # geometry after loading
    return hasher.hexdigest()[:20]


@torch.inference_mode()
def build_cache(directory: Path, segmenter, dataset, device: torch.device | str = "cpu",
                tile: int | tuple[int, int] | None = None, num_workers: int = 0) -> Path:
    """Run the frozen front-end over ``dataset`` (untransformed images) and write the cache."""
    from dilatedseg.inference import frontend_logits_tiled

    directory = Path(directory)
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    frontend, was_training = segmenter.frontend, segmenter.frontend.training
    frontend.eval()
    index, logits_offset, label_offset = [], 0, 0
    # Its own generator: building a cache must not shift the training run's random stream.
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers,
                        generator=torch.Generator())
    try:
        with open(partial / "logits.bin", "wb") as logits_file, \
                open(partial / "labels.bin", "wb") as labels_file:
            for item in loader:
                image = item["image"].to(device)
                if tile is not None:
                    tiles = (tile, tile) if isinstance(tile, int) else tuple(tile)
                    logits = frontend_logits_tiled(segmenter, image, tiles)
                else:
                    logits = segmenter.frontend_logits(image)
                logits = logits[0].float().cpu().numpy()
                label = item["label"][0].numpy().astype(np.uint8)
                logits_file.write(logits.tobytes())
                labels_file.write(label.tobytes())
                index.append({"name": item["name"][0], "logits_shape": list(logits.shape),
                              "logits_offset": logits_offset, "label_shape": list(label.shape),
                              "label_offset": label_offset})
                logits_offset += logits.size
                label_offset += label.size
        (partial / "index.json").write_text(json.dumps({"version": CACHE_VERSION,
                                                        "items": index}))
        if not directory.exists():  # else built meanwhile by another process: keep that one
            os.replace(partial, directory)
    finally:  # (an unused or interrupted build goes)
        frontend.train(was_training)
        shutil.rmtree(partial, ignore_errors=True)
    return directory


class CachedLogitsDataset(Dataset):
    """Items {"frontend_logits": (C, h, w) float, "label": (H, W) uint8, "name"} from a cache.

    ``source`` is the split's image dataset (what the cache is computed from); the dataset can
    stand in for it (same length) before the cache exists, and reads items once a cache
    directory is attached (:meth:`attach`, or ``directory`` here).
    """

    def __init__(self, source=None, mirror: bool = False, directory: str | Path | None = None):
        self.source, self.mirror = source, mirror
        self.directory = self.items = None
        self._logits = self._labels = None  # memory maps, opened lazily in each worker
        if directory is not None:
            self.attach(directory)

    def attach(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.items = json.loads((self.directory / "index.json").read_text())["items"]
        if self.source is not None and len(self.items) != len(self.source):
            raise RuntimeError(f"feature cache {directory} holds {len(self.items)} items, the "
                               f"split has {len(self.source)}: delete the cache directory")
        # Pad to the largest size when sizes differ (a batch needs one size); labels to the
        # logits' extent (8 px per logit), which a mirrored label spans (see __getitem__).
        self.logits_size = tuple(max(it["logits_shape"][i] for it in self.items) for i in (1, 2))
        self.label_size = tuple(
            max(max(it["label_shape"][i], OUTPUT_STRIDE * it["logits_shape"][i + 1])
                for it in self.items) for i in (0, 1))
        # Only then do items carry their own size (a one-size split, as Cityscapes, needs none).
        self.mixed_sizes = len({tuple(it["logits_shape"][1:]) for it in self.items}) > 1
        self._logits = self._labels = None

    def __len__(self) -> int:
        return len(self.items) if self.items is not None else len(self.source)

    def _arrays(self) -> tuple[np.memmap, np.memmap]:
        if self.items is None:
            raise RuntimeError("CachedLogitsDataset used before its cache was built / attached")
        if self._logits is None:
            self._logits = np.memmap(self.directory / "logits.bin", np.float32, mode="r")
            self._labels = np.memmap(self.directory / "labels.bin", np.uint8, mode="r")
        return self._logits, self._labels

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_logits": None, "_labels": None}

    def __getitem__(self, index: int) -> dict:
        logits_array, labels_array = self._arrays()
        item = self.items[index]
        n, start = int(np.prod(item["logits_shape"])), item["logits_offset"]
        m, label_start = int(np.prod(item["label_shape"])), item["label_offset"]
        logits = torch.from_numpy(np.array(logits_array[start: start + n]))
        logits = logits.view(item["logits_shape"])
        label = torch.from_numpy(np.array(labels_array[label_start: label_start + m]))
        label = label.view(item["label_shape"])
        if self.mirror and torch.rand(()) < 0.5:
            # Logit j covers pixels 8j..8j+7, so the logits span 8w >= W px: mirror the label
            # about that extent (255 beyond W), or a width that is not a multiple of 8 shifts
            # the two apart by 8w - W px.
            extent = OUTPUT_STRIDE * logits.shape[-1]
            label = F.pad(label, (0, extent - label.shape[-1]), value=IGNORE_INDEX)
            logits, label = logits.flip(-1), label.flip(-1)
        h, w = logits.shape[-2:]
        if (h, w) != self.logits_size:
            logits = F.pad(logits, (0, self.logits_size[1] - w, 0, self.logits_size[0] - h))
        hl, wl = label.shape
        if (hl, wl) != self.label_size:
            label = F.pad(label, (0, self.label_size[1] - wl, 0, self.label_size[0] - hl),
                          value=IGNORE_INDEX)
        out = {"frontend_logits": logits, "label": label, "name": item["name"]}
        if self.mixed_sizes:
            out["logits_size"] = torch.tensor([h, w])
        return out


class FrontendLogitsCache(Callback):
    """Train and validate the context stage on cached front-end logits (see module docstring).

    At ``setup`` (before Lightning builds any dataloader) the data module's train / val
    datasets are replaced by :class:`CachedLogitsDataset` readers (standing in with the right
    length until attached); at ``on_fit_start`` the caches are found or built with the
    front-end's final weights (``init_from``'s, or those a resumed checkpoint restored by then)
    and attached, before any item is read.

    Args:
        cache_dir: where the caches live; None = ``<runs>/<dataset>/cache`` next to the stage
            directories (``<default_root_dir>/cache`` outside that layout).
        splits: the data module splits to cache.
    """

    def __init__(self, cache_dir: str | None = None, splits: tuple[str, ...] = ("train", "val")):
        self.cache_dir, self.splits = cache_dir, tuple(splits)

    def root(self, trainer) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        run_dir = Path(trainer.default_root_dir)
        if run_dir.parent.name == "context":  # runs/<dataset>/context/<version>
            return run_dir.parent.parent / "cache"
        return run_dir / "cache"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        check_cacheable(pl_module.hparams)
        datamodule = trainer.datamodule
        if not isinstance(getattr(datamodule, "datasets", None), dict):
            rank_zero_warn("feature_cache needs a dilatedseg data module; training uncached.")
            return
        if getattr(datamodule, "crop_size", None) or getattr(datamodule, "scale_range", None):
            rank_zero_info("feature cache: training on whole images (crops / scaling are not "
                           "applied to cached logits; mirroring is).")
        for split in self.splits:
            dataset = datamodule.datasets.get(split)
            if dataset is None or isinstance(dataset, CachedLogitsDataset):
                continue
            items = limited_items(trainer, datamodule, split)
            if items == 0:
                continue  # never read (limit_val_batches=0): nothing to cache
            mirror = split == "train" and bool(getattr(datamodule, "mirror", False))
            datamodule.datasets[split] = CachedLogitsDataset(
                whole_images(dataset, split, items), mirror=mirror)

    def on_fit_start(self, trainer, pl_module) -> None:
        # Lightning has restored a resumed checkpoint's weights by now and has not built the
        # loaders yet (so no worker holds a stand-in dataset: nothing may ask for the run's
        # length before this, see the poly schedule in module.py).
        self.build_and_attach(trainer, pl_module)

    def build_and_attach(self, trainer, pl_module) -> None:
        """Find or build each split's cache (rank 0 builds, others wait) and attach it."""
        datamodule = trainer.datamodule
        pl_module.load_initial_weights()  # the cache key needs the final front-end weights
        pl_module.to(trainer.strategy.root_device)
        segmenter = pl_module.model
        tile = pl_module.hparams.get("tile_size")
        kind = f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"
        for split in self.splits:
            dataset = getattr(datamodule, "datasets", {}).get(split)
            if not isinstance(dataset, CachedLogitsDataset) or dataset.source is None:
                continue
            directory = None
            if trainer.is_global_zero:
                key = cache_key(segmenter, dataset.source, kind)
                directory = self.root(trainer) / f"{split}-{key}"
                if not (directory / "index.json").is_file():
                    rank_zero_info(f"feature cache: computing front-end logits of "
                                   f"{len(dataset.source)} '{split}' images into {directory}")
                    build_cache(directory, segmenter, dataset.source, pl_module.device, tile,
                                getattr(datamodule, "num_workers", 0))
                else:
                    rank_zero_info(f"feature cache: using {directory}")
            # Rank 0's choice, also where another node's copy of the data hashes differently
            # (its files' times); the others wait here until it is built.
            directory = trainer.strategy.broadcast(directory)
            check_visible(directory, trainer.global_rank)
            dataset.attach(directory)


def check_visible(directory: Path, rank: int) -> None:
    """The cache rank 0 built must be readable here: on another node only through a
    filesystem both share."""
    if not (directory / "index.json").is_file():
        raise RunError(
            f"feature cache: process {rank} cannot see {directory}, which global rank 0 "
            "built: training on several nodes with the cache needs the runs folder (or "
            "--model.feature_cache_dir) on a filesystem every node shares; put it there, or "
            "train uncached (--model.feature_cache=false)")


def check_cacheable(hparams) -> None:
    """The cached context stage trains and validates whole images from cached logits: options
    that need the images, or the network run per tile, are a RunError that says what to do."""
    crf = hparams.get("crf", "none")
    if hparams.get("tile_whole_network") and hparams.get("tile_size"):
        raise RunError(
            "--model.tile_whole_network=true runs the network per image tile, and the "
            "cached context stage validates whole images from cached logits: train "
            "without it and evaluate the checkpoint with `dilatedseg validate ... "
            "--ckpt_path=... --model.tile_whole_network=true`, or train uncached "
            "(--model.feature_cache=false)")
    if crf != "none":
        raise RunError(
            f"--model.crf={crf} needs the images, and the cached context stage trains and "
            "validates on cached logits without them: train without the CRF and evaluate "
            "the checkpoint with `dilatedseg validate ... --ckpt_path=... "
            "--model.crf=dense`, or train uncached (--model.feature_cache=false, with a "
            "--data.init_args.crop_size when images differ in size)")


def whole_images(dataset, split: str, items: int | None):
    """A copy of a split's dataset that yields its whole, un-augmented images, one per item
    (what the cache holds), limited to the first ``items`` when a run reads no more."""
    plain = copy.copy(dataset)
    plain.transform, plain.crops = None, 1
    if items is not None and items < len(plain.pairs):
        rank_zero_info(f"feature cache: the run reads at most {items} '{split}' "
                       f"items (batch limits), so only the first {items} are cached")
        plain.pairs = plain.pairs[:items]
    return plain


def limited_items(trainer, datamodule, split: str) -> int | None:
    """How many items of ``split`` a run limited to a number of batches (limit_*_batches as an
    int, or fast_dev_run) reads at most, over all processes; None when unlimited."""
    limit = trainer.limit_train_batches if split == "train" else trainer.limit_val_batches
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None  # a fraction (1.0 = all)
    batch = getattr(datamodule, "batch_size" if split == "train" else "val_batch_size", 1)
    return limit * batch * trainer.world_size


__all__ = ["FrontendLogitsCache", "CachedLogitsDataset", "build_cache", "cache_key"]
