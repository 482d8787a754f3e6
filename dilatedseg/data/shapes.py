"""The embedded synthetic dataset: "flags and teams", where context decides the class.

Each image shows one flag (a solid red, green or blue disc) and a few grey striped shapes far
away from it. The flag and every shape belong to the flag's team: ``team_red``,
``team_green`` or ``team_blue``. A shape's own pixels look the same for every team, so its
class cannot be told from a small neighbourhood: a network must see the flag, 60+ pixels away.
A front-end with a ~54 px receptive field can only guess a shape's team; a context module on
its 1/8-resolution logits can carry the flag's evidence across the image.

The images are generated from a seed and written to disk on first use (PNG images, palette-PNG
labels, one list file per split), so training reads them through the same path as real data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dilatedseg.data.base import DataError, SegmentationDataModule
from dilatedseg.viz import palette_png

CLASSES = ("background", "team_red", "team_green", "team_blue")
PALETTE = ((0, 0, 0), (220, 40, 40), (40, 200, 60), (50, 90, 230))
FLAG_COLOURS = ((205, 30, 30), (30, 185, 45), (35, 70, 220))
GENERATOR_VERSION = 1
MIN_DISTANCE = 64  # px between the flag's centre and a shape's centre
SPLIT_OFFSETS = {"train": 0, "val": 1_000_003, "test": 2_000_029}
# What generate writes into the root (and meta.json): a generation stopped midway leaves some.
WRITTEN = {"meta.json", "images", "labels", *(f"{split}.txt" for split in SPLIT_OFFSETS)}


def draw_sample(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image and its (H, W) uint8 label."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Background: a smooth random tint plus pixel noise.
    tint = rng.uniform(70, 130, size=3)
    ramp = rng.uniform(-20, 20) * (xx / size) + rng.uniform(-20, 20) * (yy / size)
    image = tint + ramp[..., None] + rng.normal(0, 8, size=(size, size, 3))
    label = np.zeros((size, size), np.uint8)

    team = int(rng.integers(3))
    flag_r = rng.uniform(11, 14)
    flag_y, flag_x = rng.uniform(flag_r + 2, size - flag_r - 2, size=2)

    placed = 0
    for _ in range(200):
        if placed == 4:
            break
        radius = rng.uniform(8, 18)
        cy, cx = rng.uniform(radius, size - radius, size=2)
        if np.hypot(cy - flag_y, cx - flag_x) < MIN_DISTANCE:
            continue
        if rng.random() < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        else:
            mask = (np.abs(yy - cy) <= radius * 0.85) & (np.abs(xx - cx) <= radius * 0.85)
        stripes = ((xx + yy + rng.uniform(0, 8)) // 4) % 2
        shade = np.where(stripes > 0, 215.0, 160.0)[..., None] + rng.normal(0, 6, (size, size, 1))
        image = np.where(mask[..., None], shade, image)
        label[mask] = team + 1
        placed += 1

    flag = (yy - flag_y) ** 2 + (xx - flag_x) ** 2 <= flag_r**2
    colour = np.array(FLAG_COLOURS[team], np.float32) + rng.normal(0, 6, (size, size, 3))
    image = np.where(flag[..., None], colour, image)
    label[flag] = team + 1
    return np.clip(image, 0, 255).astype(np.uint8), label


def generate(root: Path, seed: int, sizes: dict[str, int], image_size: int) -> None:
    """Write images/<split>/*.png, labels/<split>/*.png and <split>.txt under ``root``."""
    for split, count in sizes.items():
        rng = np.random.default_rng(seed + SPLIT_OFFSETS[split])
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        names = [f"{split}_{i:05d}" for i in range(count)]
        for name in names:
            image, label = draw_sample(rng, image_size)
            Image.fromarray(image).save(root / "images" / split / f"{name}.png")
            palette_png(label, PALETTE).save(root / "labels" / split / f"{name}.png")
        (root / f"{split}.txt").write_text("\n".join(names) + "\n")


class ShapesDataModule(SegmentationDataModule):
    """The embedded "flags and teams" dataset (4 classes, 128x128), generated on first use."""

    name = "shapes"
    classes = CLASSES
    palette = PALETTE
    mean_rgb = (100.0, 100.0, 100.0)
    layout = """\
        meta.json               generator settings; regenerated when they change
        train.txt val.txt test.txt
        images/<split>/<name>.png
        labels/<split>/<name>.png   palette PNG, values 0-3
    """

    def __init__(
        self,
        root: str = "data/shapes",
        seed: int = 0,
        train_size: int = 800,
        val_size: int = 100,
        test_size: int = 100,
        image_size: int = 128,
        **kwargs,
    ):
        super().__init__(root=root, **kwargs)
        self.seed, self.image_size = seed, image_size
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}

    def meta(self) -> dict:
        return {"version": GENERATOR_VERSION, "seed": self.seed, "sizes": self.sizes,
                "image_size": self.image_size}

    def prepare_data(self) -> None:
        """Generate the dataset unless ``root`` already holds it with the same settings."""
        meta_path = self.root / "meta.json"
        if meta_path.is_file() and json.loads(meta_path.read_text()) == self.meta():
            return
        self.check_root()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            meta_path.unlink(missing_ok=True)
            generate(self.root, self.seed, self.sizes, self.image_size)
            meta_path.write_text(json.dumps(self.meta()))
        except OSError as error:  # (no permission, disk full)
            raise DataError(f"shapes: cannot write the dataset under {self.root}: {error}. "
                            f"Pass {self.option_prefix}root=<a folder you can write>") from None

    def check_root(self) -> None:
        """A root the dataset cannot be generated into stops: a file, or a folder holding
        files of its own (another dataset's train.txt would be overwritten)."""
        fix = f"pass {self.option_prefix}root=<a new folder> (the dataset is generated there)"
        if self.root.exists() and not self.root.is_dir():
            raise DataError(f"shapes: root {self.root} is a file: {fix}")
        if not self.root.is_dir() or (self.root / "meta.json").is_file():
            return
        other = sorted(path.name for path in self.root.iterdir() if path.name not in WRITTEN)
        if other:
            raise DataError(f"shapes: {self.root} holds no shapes dataset (meta.json) but "
                            f"other files ({', '.join(other[:3])}{', ...' * (len(other) > 3)}), "
                            f"which generating one there could overwrite: {fix}")

    def check_files(self, stage: str) -> None:
        """Before anything is built: the root the dataset will be generated into."""
        super().check_files(stage)
        self.check_root()

    def stage_splits(self, stage: str) -> list[str]:
        """None to check ahead: ``prepare_data`` generates whatever is missing."""
        return []

    def pairs(self, split: str) -> list[tuple[Path, Path | None]]:
        names = self.listed_names(self.root / f"{split}.txt")
        return [(self.root / "images" / split / f"{n}.png",
                 self.root / "labels" / split / f"{n}.png") for n in names]
