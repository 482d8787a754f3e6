"""Training augmentation: reflect-padded images, 255-padded labels, the authors' context
margin (image crops larger than their labels, cut from the real image), and random streams that
differ between DataLoader workers and repeat under one seed."""

import numpy as np
import pytest
from lightning.pytorch import seed_everything
from PIL import Image

from dilatedseg.data import VOCDataModule
from dilatedseg.data.base import SegmentationDataset
from dilatedseg.data.transforms import train_transform

H, W = 60, 80


def coordinate_image():
    """Each pixel holds its own (row, column) in channels 0 and 1, so a crop tells where in
    the image (or in its reflection) every pixel came from; its label is a function of them."""
    rows, cols = np.mgrid[0:H, 0:W]
    image = np.stack([rows, cols, np.full_like(rows, 7)], -1).astype(np.uint8)
    label = ((rows // 5 + cols // 5) % 4).astype(np.uint8)
    return image, label


def label_of(image):
    return ((image[..., 0] // 5 + image[..., 1] // 5) % 4).astype(np.uint8)


def window_of_reflected_image(crop, image, pad):
    """Whether ``crop`` equals a window of ``image`` reflect-padded (REFLECT_101) by ``pad``."""
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    h, w = crop.shape[:2]
    return any(np.array_equal(padded[y: y + h, x: x + w], crop)
               for y in range(padded.shape[0] - h + 1) for x in range(padded.shape[1] - w + 1))


def test_small_image_is_reflect_padded_and_its_label_filled_with_ignore():
    image, label = coordinate_image()
    out = train_transform((96, 96), mirror=False)(image=image, mask=label)
    assert out["image"].shape == (96, 96, 3) and out["mask"].shape == (96, 96)
    top, left = (96 - H) // 2, (96 - W) // 2
    assert np.array_equal(out["mask"][top: top + H, left: left + W], label)
    assert (out["mask"][:top] == 255).all() and (out["mask"][:, :left] == 255).all()
    assert window_of_reflected_image(out["image"], image, 20)


@pytest.mark.parametrize("mirror", [False, True])
def test_context_margin_crops_real_image_around_the_labels(mirror):
    image, label = coordinate_image()
    margin, crop = 12, (16, 24)
    transform = train_transform(crop, mirror=mirror, context_margin=margin)
    for _ in range(20):  # random crops (and flips)
        out = transform(image=image, mask=label)
        crop_image, crop_label = out["image"], out["mask"]
        assert crop_image.shape == (16 + 2 * margin, 24 + 2 * margin, 3)
        assert crop_label.shape == crop
        # The image crop is a window of the image reflected only past its own border (as
        # whole-image inference pads it), or that window mirrored.
        assert window_of_reflected_image(crop_image, image, margin) or (
            mirror and window_of_reflected_image(crop_image[:, ::-1], image, margin))
        # Each label sits under its own pixel: the centre of the image crop.
        centre = crop_image[margin: margin + 16, margin: margin + 24]
        labelled = crop_label != 255
        assert labelled.any()
        assert np.array_equal(crop_label[labelled], label_of(centre)[labelled])


def test_label_pixels_of_the_margin_are_ignored():
    """A labelled crop reaching past the image border is 255 there, never a reflected label."""
    image, label = coordinate_image()
    transform = train_transform((H + 16, W + 16), mirror=False, context_margin=8)
    out = transform(image=image, mask=label)
    assert out["mask"].shape == (H + 16, W + 16)
    assert (out["mask"] == 255).sum() == (H + 16) * (W + 16) - H * W
    assert np.array_equal(out["mask"][8: 8 + H, 8: 8 + W], label)


def test_scale_jitter_scales_image_and_label_alike_labels_by_nearest():
    """scale_range: image and label resized by one random factor in [low, high]; labels by
    nearest neighbour, so no value appears that is not a class of the original."""
    image, label = coordinate_image()
    out = train_transform(None, mirror=False, scale_range=(2.0, 2.0))(image=image, mask=label)
    assert out["image"].shape == (2 * H, 2 * W, 3) and out["mask"].shape == (2 * H, 2 * W)
    assert np.array_equal(out["mask"], label.repeat(2, 0).repeat(2, 1))
    shrink = train_transform(None, mirror=False, scale_range=(0.5, 0.5))(image=image, mask=label)
    assert shrink["mask"].shape == (H // 2, W // 2)
    assert set(np.unique(shrink["mask"])) <= set(np.unique(label))
    transform = train_transform((16, 16), mirror=False, scale_range=(0.5, 1.5))
    sizes = set()
    for _ in range(20):
        scaled = transform.transforms[0](image=image, mask=label)  # the scaling step alone
        sizes.add(scaled["mask"].shape)
        assert scaled["image"].shape[:2] == scaled["mask"].shape
        assert 0.5 * H - 1 <= scaled["mask"].shape[0] <= 1.5 * H + 1
        assert transform(image=image, mask=label)["mask"].shape == (16, 16)
    assert len(sizes) > 1  # random factors, not one


def crop_origins(tmp_path, seed: int, workers: int, items: int = 8) -> list[tuple[int, int, bool]]:
    """(row, column, mirrored) of each training crop the data module's loader yields, over
    ``items`` copies of one coordinate image, after ``seed_everything(seed)``."""
    image, label = coordinate_image()
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(label).save(tmp_path / "label.png")
    seed_everything(seed)
    data = VOCDataModule(root=str(tmp_path), batch_size=1, crop_size=8, num_workers=workers)
    data.datasets["train"] = SegmentationDataset(
        [(tmp_path / "image.png", tmp_path / "label.png")] * items, 21, data.read_label,
        data.train_transform())
    origins = []
    for batch in data.train_dataloader():
        crop = batch["image"][0]
        mirrored = bool(crop[1, 0, 0] > crop[1, 0, -1])
        origins.append((int(crop[0, 0, 0]), int(crop[1, 0, :].min()), mirrored))
    return origins


def test_dataloader_workers_run_opencv_on_one_thread():
    import cv2
    import torch

    from dilatedseg.data.base import seed_worker

    class Threads(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return cv2.getNumThreads()

    loader = torch.utils.data.DataLoader(Threads(), num_workers=1, worker_init_fn=seed_worker)
    assert [int(n) for n in loader] == [1, 1]


def test_dataloader_workers_draw_different_crops(tmp_path):
    """albumentations keeps its own generator, which forked workers would all copy."""
    origins = crop_origins(tmp_path, seed=0, workers=2)
    assert len(origins) == 8
    assert origins[0::2] != origins[1::2]  # items 0, 2, .. from worker 0; 1, 3, .. worker 1
    assert len(set(origins)) > 4


@pytest.mark.parametrize("workers", [0, 2])
def test_seed_everything_repeats_the_crops(tmp_path, workers):
    first = crop_origins(tmp_path, seed=3, workers=workers)
    assert crop_origins(tmp_path, seed=3, workers=workers) == first
    assert crop_origins(tmp_path, seed=4, workers=workers) != first
