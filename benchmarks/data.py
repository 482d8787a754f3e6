"""Data pipeline cost per dataloader worker: decoding and augmentation, measured separately.

    python3 benchmarks/data.py [--quick]      # or through benchmarks/run.py

One worker = one process with one thread (torch and OpenCV), as a DataLoader worker runs. Files:
the real Cityscapes / VOC files under ../shared/realdata when present, else generated ones of the
same size and format (a Cityscapes 2048x1024 RGB PNG + 8-bit label PNG, the same image as a JPEG,
a VOC 500x375 JPEG + palette PNG). Augmentation is the recipes' own
(:func:`dilatedseg.data.transforms.train_transform`: pad, random crop, mirror) at the recipes' crop
sizes (256x256 labels in 628x628 image crops for the urban sets, 128x128 in 500x500 for VOC:
the context margin of 186 px) plus the conversion to tensors. The
last rows turn the per-worker rate into the workers one H100 needs at the training target (40 %
of bf16 peak, see benchmarks/frontend.py).
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
from common import H100_BF16_TFLOPS, Row, Timing, markdown, timed
from PIL import Image

from dilatedseg.data.base import SegmentationDataset, check_label, read_image, read_index_png
from dilatedseg.data.transforms import train_transform
from dilatedseg.flops import frontend_macs

REALDATA = Path(__file__).resolve().parents[2] / "shared/realdata"
CITYSCAPES = REALDATA / "cityscapes"
VOC = REALDATA / "voc"
TRAIN_MFU_TARGET = 0.40
CONTEXT_MARGIN = 186  # the recipes' context_margin (VGG-16, valid geometry)
CROPS = 4  # crops_per_image of the decode-amortising row


def synthetic_scene(height: int, width: int, classes: int, seed: int = 0):
    """A smooth street-like image with flat regions and mild noise (compresses like a photo
    rather than like noise), and its label map."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([80 + 70 * xs / width, 100 + 60 * ys / height, 150 - 50 * xs / width], -1)
    label = np.zeros((height, width), np.uint8)
    for k in range(40):
        y0, x0 = rng.integers(0, height), rng.integers(0, width)
        h, w = rng.integers(height // 20, height // 3), rng.integers(width // 30, width // 4)
        label[y0: y0 + h, x0: x0 + w] = k % classes
        image[y0: y0 + h, x0: x0 + w] = rng.uniform(0, 255, 3)
    image += 20 * np.sin(xs[..., None] / 7 + ys[..., None] / 13) + rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_files(tmp: Path) -> dict[str, tuple[Path, Path, str]]:
    """{name: (image, label, source)} for the Cityscapes PNG / JPEG and VOC JPEG cases."""
    files = {}
    city = sorted(CITYSCAPES.glob("leftImg8bit/*/*/*_leftImg8bit.png"))
    city_label = sorted(CITYSCAPES.glob("gtFine/*/*/*_gtFine_labelTrainIds.png"))
    image = read_image(city[0]) if city and city_label else None
    if image is not None and image.shape[:2] == (1024, 2048):
        image_path, label_path, source = city[0], city_label[0], "real file"
    else:  # none there, or a downsized copy
        image, label = synthetic_scene(1024, 2048, 19)
        image_path, label_path, source = tmp / "city.png", tmp / "city_label.png", "generated"
        Image.fromarray(image).save(image_path)
        Image.fromarray(label).save(label_path)
    files["Cityscapes PNG"] = (image_path, label_path, source)
    Image.fromarray(image).save(tmp / "city.jpg", quality=95)
    files["Cityscapes as JPEG q95"] = (tmp / "city.jpg", label_path, "converted")
    voc = sorted(VOC.glob("JPEGImages/*.jpg"))
    voc_label = [VOC / "SegmentationClass" / f"{p.stem}.png" for p in voc]
    pairs = [(img, lab) for img, lab in zip(voc, voc_label) if lab.is_file()]
    if pairs:
        files["VOC JPEG"] = (*pairs[0], "real file")
    else:
        image, label = synthetic_scene(375, 500, 21, seed=1)
        Image.fromarray(image).save(tmp / "voc.jpg", quality=90)
        Image.fromarray(label, mode="L").convert("P").save(tmp / "voc.png")
        files["VOC JPEG"] = (tmp / "voc.jpg", tmp / "voc.png", "generated")
    return files


def rate_row(case: str, seconds: Timing, note: str) -> Row:
    """Time and rate of the best run (see :func:`common.timed`); the median in the note."""
    return Row("data, 1 worker", case, "CPU, 1 thread", "-", 1, seconds.best * 1e3,
               1 / seconds.best,
               note=f"{note}; {seconds.describe()}", median_ms=seconds.median * 1e3,
               runs=seconds.runs)


def workers_needed(name: str, crop: int, per_worker: float) -> Row:
    """Workers that keep one H100 at the training target busy, for ``crop`` x ``crop`` labels
    (the front-end's valid geometry adds the context margin)."""
    macs = frontend_macs("vgg16", crop, crop, "valid").training()
    needed = TRAIN_MFU_TARGET * H100_BF16_TFLOPS * 1e12 / (2 * macs)
    workers = math.ceil(needed / per_worker)
    return Row("data, workers per GPU", f"{name}, {crop}x{crop} labelled crops",
               "H100 (analytic)", "-",
               note=f"{workers} worker{'s' if workers > 1 else ''}: the GPU at "
                    f"{TRAIN_MFU_TARGET:.0%} bf16 MFU trains {needed:.0f} img/s, one worker "
                    f"prepares {per_worker:.1f}")


def run(device: torch.device | None = None, quick: bool = False,
        peak: float | None = None) -> list[Row]:
    reps = 5 if quick else 20
    cpu = torch.device("cpu")
    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rows, full = [], {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            files = make_files(Path(tmp))
            for name, (image_path, label_path, source) in files.items():
                classes = 21 if name.startswith("VOC") else 19
                crop = 128 if name.startswith("VOC") else 256
                image = read_image(image_path)
                size = f"{image.shape[1]}x{image.shape[0]}"
                kib = image_path.stat().st_size / 1024
                rows.append(rate_row(f"decode {name} {size}", timed(
                    lambda p=image_path: read_image(p), cpu, reps),
                    f"{source}, {kib:.0f} KiB"))
                if name == "Cityscapes as JPEG q95":
                    continue  # same label and augmentation as the PNG case
                rows.append(rate_row(f"decode + check label PNG of {name}", timed(
                    lambda p=label_path, c=classes: check_label(read_index_png(p), c, p),
                    cpu, reps), source))
                transform = train_transform((crop, crop), mirror=True,
                                            context_margin=CONTEXT_MARGIN)
                label = read_index_png(label_path)
                dataset = SegmentationDataset([(image_path, label_path)], classes,
                                              read_index_png, transform)
                case = f"augment {name}: pad/crop {crop}+2x{CONTEXT_MARGIN} + mirror + to tensor"
                rows.append(rate_row(case, timed(
                    lambda d=dataset, im=image, lab=label: d.sample(im, lab, "x"), cpu, reps),
                    "after decoding"))
                seconds = timed(lambda d=dataset: d[0], cpu, reps)
                full[name] = (crop, 1 / seconds.best)
                rows.append(rate_row(f"whole sample {name} (decode + check + augment)", seconds,
                                     "SegmentationDataset[i]"))
                if name == "Cityscapes PNG":  # the decode-bound case
                    several = SegmentationDataset([(image_path, label_path)], classes,
                                                  read_index_png, transform, crops=CROPS)
                    seconds = timed(lambda d=several: d[0], cpu, reps).scaled(1 / CROPS)
                    full[f"{name}, crops_per_image={CROPS}"] = (crop, 1 / seconds.best)
                    rows.append(rate_row(f"sample {name}, {CROPS} crops per decoded image",
                                         seconds, f"crops_per_image={CROPS}: per crop"))
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)
    for name, (crop, per_worker) in full.items():
        rows.append(workers_needed(name, crop, per_worker))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(markdown(run(quick=args.quick)))


if __name__ == "__main__":
    main()
