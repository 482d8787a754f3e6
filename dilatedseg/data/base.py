"""The shared base of every dataset: file pairs on disk -> checked, augmented batches.

A dataset subclass is metadata (name, classes, palette, mean, expected tree, the command that
prepares it, the splits without public labels) plus two small methods: ``pairs(split)`` lists
(image, label) files and, where the labels need mapping, ``read_label(path)`` returns a uint8
index map (255 = ignore).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from dilatedseg.data import transforms
from dilatedseg.labels import IGNORE_INDEX


class DataError(Exception):
    """A user's data is missing or malformed; the message says what and how to fix it."""


# What PIL raises for a file it cannot read: damaged, not an image, or over its pixel limit.
UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)


def unreadable(kind: str, path: Path, error: Exception, folder: Path | None = None) -> DataError:
    """The error for an image or label file that cannot be read, and the two ways out (for an
    image of a predict_dir ``folder``: no label, split list or prepare command to name)."""
    if folder is not None:
        return DataError(
            f"cannot read {kind} {path}: {error}. Replace it with an intact copy, or move it "
            f"out of predict_dir {folder}.")
    return DataError(
        f"cannot read {kind} {path}: {error}. Replace it with an intact copy (re-download it, "
        "or re-run the dataset's prepare command), or drop the example: delete its image and "
        "label, and its line in the split list where the dataset has one.")


def read_image(path: Path, folder: Path | None = None) -> np.ndarray:
    """Image file -> (H, W, 3) uint8 RGB (``folder``: the predict_dir it comes from)."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except UNREADABLE as error:
        raise unreadable("image", path, error, folder) from None


def read_index_png(path: Path) -> np.ndarray:
    """Index / palette PNG -> (H, W) uint8 label map (palette indices are the class ids)."""
    try:
        with Image.open(path) as label:
            if label.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
                raise DataError(
                    f"label {path} is a {label.mode} image; expected a single-channel index PNG "
                    "(class ids as pixel values, 255 = ignore): convert colour-coded labels to "
                    "class ids first (`dilatedseg prepare <dataset>` does, for the layouts it "
                    "reads)")
            values = np.asarray(label)
    except UNREADABLE as error:
        raise unreadable("label", path, error) from None
    if values.dtype != np.uint8 and values.size and (values.min() < 0 or values.max() > 255):
        raise DataError(
            f"label {path} is a {values.dtype} PNG holding values up to {values.max()}; class "
            "ids must fit in 0-255 (255 = ignore): convert it to an 8-bit index PNG")
    return values.astype(np.uint8, copy=False)


def list_names(listing: Path) -> list[str]:
    """Image names of a split list: one name per line, or lines of paths whose first column's
    file stem is the name (SegNet's "/x/train/a.png /x/trainannot/a.png", DeepLab's
    "/JPEGImages/a.jpg /SegmentationClassAug/a.png")."""
    names = []
    for line in listing.read_text().splitlines():
        if line.strip():
            first = line.split()[0]
            names.append(Path(first).stem if "/" in first else first)
    return names


def label_values(label: np.ndarray) -> np.ndarray:
    """The distinct values of a label map, sorted."""
    if label.dtype == np.uint8:  # a histogram is ~3x faster than np.unique on 2 Mpx
        return np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    return np.unique(label)


def check_label(label: np.ndarray, num_classes: int, path: Path) -> None:
    """Raise a DataError naming ``path`` if a value is outside [0, C) and not 255."""
    values = label_values(label)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataError(
            f"label {path} holds values {bad.tolist()} outside [0, {num_classes}) and not "
            f"{IGNORE_INDEX} (ignore). Re-run the dataset's prepare command, or fix the file.")


def default_num_workers(limit: int = 16) -> int:
    """Dataloader workers when none are given: the usable CPU cores, at most ``limit``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(limit, cores))


def augmentation_seed() -> int:
    """A seed for a training transform's own generator, from torch's seed of this process
    (``seed_everything``'s; in a DataLoader worker, that worker's) and its global rank.

    albumentations draws from a generator of its own per ``Compose``, which neither
    ``seed_everything`` nor PyTorch's per-worker seeding reaches: made once in the main
    process, it would be copied into every forked worker, and every worker would cut the same
    crops and flips (and runs with one seed would still differ).
    """
    return int(np.random.SeedSequence([torch.initial_seed(), rank_zero_only.rank])
               .generate_state(1)[0])


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Lightning's worker seeding (torch, numpy and random per
    worker and rank), then the dataset's training transform, from the worker's own seed; one
    OpenCV thread per worker (torch already takes one: the workers are the parallelism, and
    OpenCV's own pool in each of them would oversubscribe the cores)."""
    pl_worker_init_function(worker_id)
    cv2.setNumThreads(1)
    transform = getattr(get_worker_info().dataset, "transform", None)
    if transform is not None:
        transforms.seed(transform, augmentation_seed())


def image_size(path: Path, folder: Path | None = None) -> tuple[int, int]:
    """(width, height) of an image file, from its header (``folder``: its predict_dir)."""
    try:
        with Image.open(path) as image:
            return image.size
    except UNREADABLE as error:
        raise unreadable("image", path, error, folder) from None


def folder_images(folder: Path) -> list[tuple[Path, None]]:
    """Every .png / .jpg / .jpeg image under ``folder``, sorted, without labels."""
    if not folder.is_dir():
        raise DataError(f"predict_dir {folder} is not a folder; point it at a folder of images")
    images = sorted(p for p in folder.rglob("*")
                    if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file())
    if not images:
        raise DataError(f"predict_dir {folder} holds no .png / .jpg images")
    named: dict[str, Path] = {}
    for image in images:  # written as <name>.png: the suffix dropped, and case-blind disks
        name = image.relative_to(folder).with_suffix("")
        other = named.setdefault(name.as_posix().casefold(), image)
        if other != image:
            raise DataError(
                f"predict_dir {folder}: {other.relative_to(folder)} and "
                f"{image.relative_to(folder)} would both be predicted to {name}.png: rename "
                "or move one of them")
    return [(image, None) for image in images]


class SegmentationDataset(Dataset):
    """(image, label) files -> {"image": uint8 RGB (3,H,W), "label": uint8 (H,W), "name"}.

    Images and labels stay uint8 (a quarter / an eighth of float32's / int64's bytes to pass
    from the workers and copy to the GPU); the model normalises images to float there, and the
    loss widens labels to int64 there.

    ``size``: (H, W) every image and label is resized to as it loads (None: as on disk).
    ``crops`` > 1: each item is that many independent draws of ``transform`` (random crops)
    from one decoded image, stacked: "image" (crops, 3, h, w), "label" (crops, h, w), "name" a
    list; :func:`collate_crops` batches them. Decoding a 2 Mpx PNG costs far more than cropping
    it, so this multiplies what one dataloader worker delivers.
    ``unchecked``: added to an error in a file found as it loads, where the checks before
    training read only a sample of the split (how to read every file first).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path | None]],
        num_classes: int,
        read_label: Callable[[Path], np.ndarray],
        transform: Callable | None = None,
        crops: int = 1,
        size: tuple[int, int] | None = None,
        names_under: Path | None = None,
    ):
        self.pairs, self.num_classes = list(pairs), num_classes
        self.read_label, self.transform, self.crops = read_label, transform, crops
        self.size, self.names_under = size, names_under
        self.unchecked = ""

    def name(self, index: int) -> str:
        """An item's name: its image's file name without suffix; relative to ``names_under``
        when given (a predict_dir's sub-folders may repeat file names)."""
        image = self.pairs[index][0]
        if self.names_under is None:
            return image.stem
        return image.relative_to(self.names_under).with_suffix("").as_posix()

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path, self.names_under)
        label = None if label_path is None else self.read_label(label_path)
        if label is not None:
            if label.shape != image.shape[:2]:
                raise DataError(
                    f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its label "
                    f"{label_path} is {label.shape[1]}x{label.shape[0]}; they must match: "
                    "replace the wrong one with an intact copy (re-download it, or re-run the "
                    "dataset's prepare command), or drop the example.")
            check_label(label, self.num_classes, label_path)
        if self.size is not None:
            image, label = transforms.resize(image, label, self.size)
        return image, label

    def __getitem__(self, index: int) -> dict:
        try:
            image, label = self.load(index)
        except DataError as error:
            if not self.unchecked:
                raise
            raise DataError(f"{error}\n{self.unchecked}") from None
        if label is None:
            label = np.full(image.shape[:2], IGNORE_INDEX, np.uint8)
        name = self.name(index)
        if self.crops == 1:
            return self.sample(image, label, name)
        samples = [self.sample(image, label, name) for _ in range(self.crops)]
        return {"image": torch.stack([s["image"] for s in samples]),
                "label": torch.stack([s["label"] for s in samples]),
                "name": [name] * self.crops}

    def sample(self, image: np.ndarray, label: np.ndarray, name: str) -> dict:
        """One (transformed) sample as tensors."""
        if self.transform is not None:
            out = self.transform(image=image, mask=label)
            image, label = out["image"], out["mask"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1),
            "label": torch.from_numpy(np.array(label, dtype=np.uint8, copy=True)),
            "name": name,
        }


def collate_crops(items: list[dict]) -> dict:
    """A batch of :class:`SegmentationDataset` items holding several crops each: the crops of
    all items side by side, one batch of ``len(items) x crops``."""
    return {"image": torch.cat([item["image"] for item in items]),
            "label": torch.cat([item["label"] for item in items]),
            "name": [name for item in items for name in item["name"]]}


# The loaders each Lightning stage sets up (predict: see stage_loaders).
STAGE_LOADERS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


class SegmentationDataModule(L.LightningDataModule):
    """Base LightningDataModule; subclasses set the metadata and implement ``pairs``.

    Args:
        root: dataset root directory.
        batch_size: training batch size (per process under DDP).
        crop_size: training crop (H, W) or int; images smaller than it are padded (labels with
            255). None trains on whole images.
        val_batch_size: batch size for validate / test / predict.
        num_workers: dataloader worker processes; None = the usable CPU cores shared among the
            devices of the run, at most 16 per device (``make bench``: one worker decodes and
            crops 17-25 Cityscapes images/s on a 2-core EPYC; an H100 at 40 % MFU trains ~270
            crops/s: see ``crops_per_image``).
        mirror: random horizontal flips during training.
        scale_range: optional (min, max) random rescaling during training (off in the paper).
        context_margin: training image crops extend this many px past their labelled crop on
            every side, real image where there is one (the authors' scheme: 186 for the VGG-16
            front-end in valid geometry, i.e. 628 x 628 image crops around 256 x 256 labels);
            the module then runs the front-end on them unpadded. 0: image and label crops
            match, and the front-end pads each crop itself (the only choice for
            ``padding: same``). Whole images (no ``crop_size``) need none: the front-end
            reflect-pads them just so. See :mod:`dilatedseg.data.transforms`.
        label_check: "all" checks every label's values before training; "sample" checks up to
            64 per split (values are still checked as each file loads); "auto" picks "all" for
            up to 1000 files.
        predict_split: the split ``predict`` runs on, unless ``predict_dir`` is given.
        predict_dir: a folder of images (any depth, .png/.jpg) to predict on instead.
        resize: (H, W) every image and label of every split is resized to as it loads
            (images area-averaged or bilinear, labels nearest), so training, validation and
            predictions are at that size: the paper's CamVid is 640 x 480 (``[480, 640]``).
            None keeps the files' size.
        crops_per_image: training crops cut from each decoded image (default 1). Decoding
            dominates a worker's time (a Cityscapes PNG ~55 ms, a crop < 1 ms, ``make bench``),
            so k crops per image give ~k times the samples per worker when the GPU waits for
            data; a batch of ``batch_size`` then holds batch_size / k images (k must divide
            it), and an epoch k times as many crops.
    """

    name = "base"
    classes: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()
    categories: tuple[str, ...] | None = None  # category of each class (category IoU), if any
    # Predictions written for an evaluation server: class index -> the server's label id.
    submission_ids: np.ndarray | None = None
    mean_rgb: tuple[float, float, float] = (123.675, 116.28, 103.53)
    layout = ""  # the expected directory tree, shown when data is missing
    layouts: tuple[str, ...] = ()  # on-disk variants a dataset reads, the default first
    source = ""  # where to download it, shown when data is missing
    layout_name: str | None = None
    # Splits whose labels are not public (an evaluation server scores them): ``test`` and
    # ``validate`` stop on them before reading a file, ``predict`` reads their images.
    unlabelled_splits: tuple[str, ...] = ()
    # How the command reading the data spells its root / layout options in messages: the
    # LightningCLI's, or "--" for `dilatedseg prepare` (--root, --layout).
    option_prefix = "--data.init_args."

    def __init__(
        self,
        root: str,
        batch_size: int = 8,
        crop_size: int | tuple[int, int] | None = None,
        val_batch_size: int = 1,
        num_workers: int | None = None,
        mirror: bool = True,
        scale_range: tuple[float, float] | None = None,
        context_margin: int = 0,
        label_check: str = "auto",
        pin_memory: bool = True,
        predict_split: str = "val",
        predict_dir: str | None = None,
        crops_per_image: int = 1,
        resize: int | tuple[int, int] | None = None,
    ):
        super().__init__()
        self.root = Path(root).expanduser()
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got batch_size={batch_size}, "
                             f"val_batch_size={val_batch_size}")
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.crop_size = (crop_size, crop_size) if isinstance(crop_size, int) else crop_size
        if self.crop_size is not None and (len(self.crop_size) != 2 or min(self.crop_size) < 1):
            raise ValueError(f"crop_size must be positive, got {crop_size}: [height, width] in "
                             "px, or one size")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0: load in the main process) or null "
                             f"(one per CPU core), got {num_workers}")
        self.auto_workers = num_workers is None
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        if scale_range is not None and not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be [low, high] with 0 < low <= high, got "
                             f"{list(scale_range)}")
        if scale_range is not None and self.crop_size is None and batch_size > 1:
            raise ValueError("scale_range without a crop_size gives images of different sizes, "
                             "which do not batch: set crop_size, or batch_size: 1")
        self.mirror, self.scale_range = mirror, scale_range
        if context_margin < 0:
            raise ValueError(f"context_margin must be >= 0 px, got {context_margin}")
        self.context_margin = context_margin
        if label_check not in ("auto", "all", "sample"):
            raise ValueError(f"label_check must be 'auto', 'all' or 'sample', got {label_check!r}")
        self.label_check, self.pin_memory = label_check, pin_memory
        self.predict_split = predict_split
        self.predict_dir = None if predict_dir is None else Path(predict_dir).expanduser()
        if crops_per_image < 1 or batch_size % crops_per_image:
            raise ValueError(f"crops_per_image must divide batch_size ({batch_size}), got "
                             f"{crops_per_image}")
        if crops_per_image > 1 and self.crop_size is None:
            raise ValueError("crops_per_image > 1 needs a crop_size (whole images are all alike)")
        self.crops_per_image = crops_per_image
        self.resize = (resize, resize) if isinstance(resize, int) else resize
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            raise ValueError(f"resize must be [height, width] in px (or one size), got {resize}")
        self.datasets: dict[str, SegmentationDataset] = {}
        # The loaders ("train", "val", ...) whose label values and image sizes check_data
        # has read: setup and the loaders do not read them again.
        self.checked_ahead: set[str] = set()
        self.header_sizes: dict[Path, tuple[int, int]] = {}  # read by image_header: once

    # ---- metadata a subclass provides -------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def prepare_command(self) -> str:
        command = f"dilatedseg prepare {self.name} --root {self.root}"
        if self.layouts and self.layout_name != self.layouts[0]:
            command += f" --layout {self.layout_name}"
        return command

    def choose_layout(self, layout: str) -> None:
        """Set which of ``layouts`` the files on disk follow."""
        if layout not in self.layouts:
            raise ValueError(f"{self.name} layout must be one of {list(self.layouts)}, "
                             f"got {layout!r}")
        self.layout_name = layout

    def pairs(self, split: str) -> list[tuple[Path, Path | None]]:
        """(image, label) paths of a split ("train", "val", "test"); label None throughout
        for a split of ``unlabelled_splits``."""
        raise NotImplementedError

    def read_label(self, path: Path) -> np.ndarray:
        return read_index_png(path)

    # ---- shared machinery -------------------------------------------------------------------
    def missing(self, what: str) -> DataError:
        """A DataError naming what is missing, the expected tree and the prepare command."""
        tree = f"\nExpected under {self.root}:\n{self.layout.rstrip()}" if self.layout else ""
        source = f"\nDownload: {self.source}" if self.source else ""
        return DataError(f"{self.name}: {what}.{tree}{source}\n"
                         f"Prepare it with: {self.prepare_command}")

    def images_in(self, folder: Path, pattern: str = "*.png") -> list[Path]:
        """The images matching ``pattern`` under ``folder``, sorted; a missing folder, or one
        without such images, stops."""
        if not folder.is_dir():
            raise self.missing(f"image folder {folder} is missing")
        images = sorted(folder.glob(pattern))
        if not images:
            raise self.missing(f"image folder {folder} holds no {pattern} images")
        return images

    def listed_names(self, listing: Path, hint: str = "") -> list[str]:
        """The image names of a split list (see :func:`list_names`); a missing or empty list
        stops."""
        if not listing.is_file():
            raise self.missing(f"split list {listing} is missing{hint}")
        names = list_names(listing)
        if not names:
            raise self.missing(f"split list {listing} is empty{hint}")
        return names

    def checked_pairs(self, split: str, labelled: bool = False) -> list[tuple[Path, Path | None]]:
        """``pairs(split)`` with every listed file present (and labels, if ``labelled``: a split
        in ``unlabelled_splits`` stops first, whatever files are there)."""
        if labelled and split in self.unlabelled_splits:
            raise DataError(
                f"{self.name}: split '{split}' has no labels (they are not public), so there is "
                "nothing to score: evaluate on 'val' with `dilatedseg validate`, or predict "
                f"'{split}' for the evaluation server with `dilatedseg predict "
                f"--data.init_args.predict_split={split}`")
        if self.root.exists() and not self.root.is_dir():
            raise self.missing(f"dataset root {self.root} is a file, not the dataset's folder")
        if not self.root.is_dir():
            raise self.missing(f"dataset root {self.root} does not exist")
        try:
            pairs = self.pairs(split)
        except DataError as error:
            raise self.elsewhere(error, split) from None
        if not pairs:
            raise self.missing(f"no images found for split '{split}'")
        for image, label in pairs:
            if not image.is_file():
                raise self.missing(f"image {image} (listed for split '{split}') is missing")
            if label is not None and not label.is_file():
                raise self.missing(f"image {image} has no label file {label}")
        return pairs

    def elsewhere(self, error: DataError, split: str,
                  holds: Callable[[SegmentationDataModule], bool] | None = None) -> DataError:
        """``error`` (files missing under the root), or, when a folder or layout nearby holds
        ``split``'s files (:meth:`nearby_tree`), an error naming the options that read them."""
        found = self.nearby_tree(split, holds) if self.root.is_dir() else None
        if found is None:
            return error
        root, layout = found
        options = [f"{self.option_prefix}{key}={value}" for key, value, ours in (
            ("root", root, self.root), ("layout", layout, self.layout_name)) if value != ours]
        problem = str(error).splitlines()[0].rstrip(".")
        return DataError(f"{problem}, but {root} holds the {self.name} tree"
                         f"{f' of layout {layout}' if layout != self.layout_name else ''}: "
                         f"pass {' '.join(options)}")

    def nearby_tree(self, split: str, holds: Callable[[SegmentationDataModule], bool] | None
                    = None, limit: int = 100) -> tuple[Path, str | None] | None:
        """(root, layout) of the files ``split`` would be read from when the root or layout is
        off: the root's files in another of ``layouts``, or this layout one or two levels above
        the root (a root given too low, say VOCdevkit/VOC2012) or one below it (given too
        high), or, failing those, another layout there too; None when there are none.
        ``holds(module)``: whether a module with that root and layout finds its files (default
        :meth:`holds_split`; a converter passes what it reads, as CamVid's colour labels)."""
        below = sorted(p for p in self.root.iterdir() if p.is_dir())[:limit]
        roots = [self.root, *self.root.parents[:2], *below]
        candidates = sorted(  # one option off before both
            ((root, layout) for root in roots for layout in self.layouts or [self.layout_name]
             if (root, layout) != (self.root, self.layout_name)),
            key=lambda found: (found[0] != self.root) + (found[1] != self.layout_name))
        for root, layout in candidates:
            other = copy.copy(self)
            other.root, other.layout_name = root, layout
            if holds(other) if holds is not None else other.holds_split(split):
                return root, layout
        return None

    def holds_split(self, split: str) -> bool:
        """Whether the root holds ``split``'s files in this layout (its first image and label,
        at least: a folder with the images alone would only trade one error for another)."""
        try:
            pairs = self.pairs(split)
        except (DataError, OSError):
            return False
        return bool(pairs) and all(path is None or path.is_file() for path in pairs[0])

    def stage_loaders(self, stage: str) -> dict[str, str]:
        """The loaders ``setup(stage)`` makes ("train", "val", "test", "predict"), each with
        the split it reads; none for a ``predict_dir``."""
        if stage == "predict":
            return {} if self.predict_dir is not None else {"predict": self.predict_split}
        return {key: key for key in STAGE_LOADERS.get(stage, ())}

    def stage_splits(self, stage: str) -> list[str]:
        """The splits whose files are checked before ``setup(stage)`` reads them."""
        return list(self.stage_loaders(stage).values())

    def check_files(self, stage: str) -> None:
        """Fail fast if a split that ``stage`` reads is missing or incomplete (file presence
        only: :meth:`check_data` checks the rest)."""
        if stage == "predict" and self.predict_dir is not None:
            for image, _ in folder_images(self.predict_dir):
                self.image_header(image, self.predict_dir)  # a file that is no image stops
        for split in self.stage_splits(stage):
            self.checked_pairs(split, labelled=stage != "predict")

    def check_data(self, stage: str, processes: int | None = None) -> None:
        """Everything about ``stage``'s data that can fail before a model is built (the CLI
        calls it before ImageNet weights are fetched or W&B starts): files, label values (per
        ``label_check``) and batches. ``processes``: the run's world size, None when it is not
        known yet: then a training split must hold one batch (true of any world size), and
        the loader checks it per process. The datasets checked stay in ``datasets``;
        ``setup`` and the loaders skip what this checked."""
        self.check_files(stage)
        if not self.stage_splits(stage) and not (stage == "predict" and self.predict_dir):
            return  # nothing on disk to read ahead (shapes: prepare_data writes it)
        for key, dataset in self.stage_datasets(stage).items():  # (label values read here)
            self.check_batches(key, dataset, processes or 1)
            self.datasets[key] = dataset
            self.checked_ahead.add(key)

    def label_sample(self, count: int) -> Sequence[int]:
        """The items of a split of ``count`` whose files ``check_labels`` reads: all of them,
        or (``label_check: sample``, or ``auto`` over 1000 files) 64 spread over the split."""
        if self.label_check == "all" or (self.label_check == "auto" and count <= 1000):
            return range(count)
        return np.linspace(0, count - 1, min(count, 64)).astype(int)

    def check_labels(self, dataset: SegmentationDataset) -> None:
        """Load labels before training so bad values fail early, naming the file."""
        for index in self.label_sample(len(dataset)):
            if dataset.pairs[index][1] is not None:
                dataset.load(index)

    def unchecked_advice(self, split: str, count: int) -> str:
        """What an error in a file of ``split`` found as it loads adds: how to read every file
        before training; "" where ``check_labels`` reads them all."""
        read = len(self.label_sample(count))
        if read == count:
            return ""
        return (f"(found as it loaded: label_check: {self.label_check} read {read} of the "
                f"{count} files of split '{split}' before training, and others may be damaged "
                f"too: to find them all before training, run `{self.prepare_command}` or pass "
                f"{self.option_prefix}label_check=all)")

    def train_transform(self) -> Callable | None:
        transform = transforms.train_transform(self.crop_size, self.mirror, self.scale_range,
                                               self.context_margin)
        if transform is not None:  # reproducible under seed_everything (workers: seed_worker)
            transforms.seed(transform, augmentation_seed())
        return transform

    def make_dataset(self, split: str, train: bool = False, labelled: bool = True,
                     check: bool = True) -> SegmentationDataset:
        """``split``'s dataset, its files checked, and its label values unless not ``check``;
        ``train``: augmented, ``crops_per_image`` crops an item."""
        dataset = SegmentationDataset(
            self.checked_pairs(split, labelled), self.num_classes, self.read_label,
            self.train_transform() if train else None, self.crops_per_image if train else 1,
            self.resize,
        )
        dataset.unchecked = self.unchecked_advice(split, len(dataset))
        if check:
            self.check_labels(dataset)
        return dataset

    def stage_datasets(self, stage: str) -> dict[str, SegmentationDataset]:
        """The datasets ``stage`` reads, by loader ("train", "val", "test", "predict"); label
        values checked but for loaders in ``checked_ahead``."""
        if stage == "predict" and self.predict_dir is not None:
            return {"predict": SegmentationDataset(
                folder_images(self.predict_dir), self.num_classes, self.read_label,
                size=self.resize, names_under=self.predict_dir)}
        return {key: self.make_dataset(split, train=key == "train",
                                       labelled=stage != "predict",
                                       check=key not in self.checked_ahead)
                for key, split in self.stage_loaders(stage).items()}

    def setup(self, stage: str) -> None:
        self.datasets.update(self.stage_datasets(stage))

    def image_sizes(self, split: str) -> set[tuple[int, int]]:
        """The (height, width) of loader ``split``'s images as they load: ``resize``, else
        read from the files' headers (after ``setup`` or ``check_data``)."""
        dataset = self.datasets[split]
        if dataset.size is not None:
            return {tuple(dataset.size)}
        return {self.image_header(image, dataset.names_under)[::-1]
                for image, _ in dataset.pairs}

    def image_header(self, path: Path, folder: Path | None = None) -> tuple[int, int]:
        """:func:`image_size`, read once per file: the checks that need an image's size
        (predict_dir's images being images, sizes batched together, deploy tiles) share it."""
        if path not in self.header_sizes:
            self.header_sizes[path] = image_size(path, folder)
        return self.header_sizes[path]

    def workers(self) -> int:
        """``num_workers``; when automatic, the cores divided among the run's devices."""
        trainer = getattr(self, "trainer", None)
        devices = getattr(trainer, "num_devices", 1) if trainer is not None else 1
        if self.auto_workers and devices > 1:
            return max(1, default_num_workers(limit=16 * devices) // devices)
        return self.num_workers

    def batch_items(self, split: str, dataset: Dataset) -> int:
        """Items of loader ``split`` in one batch: ``batch_size`` for "train" (its items hold
        ``crops_per_image`` crops each), else ``val_batch_size``."""
        if split == "train":
            return self.batch_size // getattr(dataset, "crops", 1)  # (cached logits: none)
        return self.val_batch_size

    def loader(self, split: str) -> DataLoader:
        """Loader ``split``: "train" shuffled, in full batches; the others each item once."""
        workers = self.workers()
        dataset = self.datasets[split]
        train = split == "train"
        processes = getattr(getattr(self, "trainer", None), "world_size", 1) or 1
        self.check_batches(split, dataset, processes, sizes=split not in self.checked_ahead)
        crops = getattr(dataset, "crops", 1)
        return DataLoader(
            dataset, batch_size=self.batch_items(split, dataset), shuffle=train,
            sampler=None if train else self.evaluation_sampler(dataset), drop_last=train,
            num_workers=workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0, collate_fn=collate_crops if crops > 1 else None,
            worker_init_fn=seed_worker,
        )

    def evaluation_sampler(self, dataset: Dataset) -> Sampler | None:
        """Under DDP, each evaluated image on exactly one process. (Lightning's default sampler
        pads the processes' shares to equal length by repeating images, which would count them
        twice in the summed confusion matrix whenever the split does not divide evenly.) None
        on one process, or with fewer images than processes (every process needs one)."""
        trainer = getattr(self, "trainer", None)
        processes = getattr(trainer, "world_size", 1) or 1
        if processes == 1 or len(dataset) < processes:
            return None
        return UnrepeatedDistributedSampler(dataset, num_replicas=processes,
                                            rank=trainer.global_rank, shuffle=False)

    def check_batches(self, split: str, dataset: Dataset, processes: int, sizes: bool = True
                      ) -> None:
        """Fail before the first step where loader ``split``'s batches cannot work: training
        that would see no full batch (fewer items per process than one batch: an epoch of
        nothing), or (``sizes``) whole images of different sizes batched together (they cannot
        be stacked)."""
        option = "batch_size" if split == "train" else "val_batch_size"
        batch = self.batch_items(split, dataset)
        if split == "train" and -(-len(dataset) // processes) < batch:
            raise DataError(
                f"{self.name}: the '{split}' split has {len(dataset)} images, fewer than one "
                f"batch of {batch} per process ({processes} process(es)), so training would "
                f"see no batch: lower --data.init_args.{option} or add images")
        cropped = split == "train" and self.crop_size is not None
        if not sizes or batch == 1 or cropped or self.resize is not None or \
                not isinstance(dataset, SegmentationDataset):
            return  # (cached logits are padded to one size)
        seen: dict[tuple[int, int], Path] = {}
        for image, _ in dataset.pairs:
            seen.setdefault(self.image_header(image, dataset.names_under), image)
            if len(seen) > 1:
                (size_a, path_a), (size_b, path_b) = seen.items()
                fix = ("set --data.init_args.crop_size, or --data.init_args.batch_size=1"
                       if split == "train" else "set --data.init_args.val_batch_size=1")
                raise DataError(
                    f"{self.name}: the '{split}' images differ in size ({path_a} is "
                    f"{size_a[0]}x{size_a[1]}, {path_b} {size_b[0]}x{size_b[1]}), so whole "
                    f"images cannot be batched {batch} at a time: {fix} (or resize them all "
                    "with --data.init_args.resize)")

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("predict")
