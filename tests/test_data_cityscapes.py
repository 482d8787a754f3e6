"""Cityscapes: the label table, the trainIds converter, a CLI run logging category IoU."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from fixtures_datasets import assert_scored, logged_metrics, make_cityscapes, tiny_args
from PIL import Image

from dilatedseg.data import CityscapesDataModule, DataError
from dilatedseg.data.cityscapes import (
    CATEGORIES,
    CLASSES,
    LABELS,
    PALETTE,
    label_id_lookup,
    train_id_lookup,
)
from dilatedseg.prepare import main as prepare

REALDATA = Path("/work/shared/realdata/cityscapes")


def test_label_table_matches_cityscapesscripts():
    from cityscapesscripts.helpers.labels import labels

    official = {label.id: label for label in labels if label.id >= 0}
    assert len(LABELS) == len(official) == 34
    for label_id, name, train_id, category in LABELS:
        label = official[label_id]
        assert (name, category) == (label.name, label.category)
        assert train_id == (label.trainId if 0 <= label.trainId < 255 else 255)
    evaluated = sorted((x for x in labels if 0 <= x.trainId < 255), key=lambda x: x.trainId)
    assert CLASSES == tuple(x.name for x in evaluated)
    assert PALETTE == tuple(x.color for x in evaluated)
    assert CATEGORIES == tuple(x.category for x in evaluated)
    assert (label_id_lookup()[train_id_lookup()[[7, 8, 11, 33]]] == [7, 8, 11, 33]).all()


def test_mean_pixel_is_the_papers_in_rgb_order():
    """REFERENCE sec. 3: BGR 72.39 82.91 73.16; the model takes RGB."""
    assert CityscapesDataModule.mean_rgb == (73.16, 82.91, 72.39)


def test_prepare_names_a_source_label_with_undefined_ids(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    source = sorted(root.glob("gtFine/train/*/*_gtFine_labelIds.png"))[0]
    label = np.array(Image.open(source))
    label[0, 0] = 34  # Cityscapes defines ids 0-33
    Image.fromarray(label).save(source)
    with pytest.raises(DataError, match=rf"{source} holds label ids \[34\] that Cityscapes does "
                                        r"not define \(0-33\)"):
        prepare(["cityscapes", "--root", str(root)])
    assert not source.with_name(source.name.replace("labelIds", "labelTrainIds")).exists()


def test_prepare_of_a_root_one_level_off_names_the_folder_that_holds_cityscapes(tmp_path):
    """Was "no gtFine/... under <root>" and, as the fix, the command that had just failed."""
    root = make_cityscapes(tmp_path / "cityscapes")
    for wrong in (tmp_path, root / "gtFine"):
        with pytest.raises(DataError, match=f"_gtFine_labelIds.png under {wrong}, but {root} "
                                            f"holds the cityscapes tree: pass --root={root}$"):
            prepare(["cityscapes", "--root", str(wrong)])
    with pytest.raises(DataError, match="Prepare it with: dilatedseg prepare cityscapes"):
        prepare(["cityscapes", "--root", str(tmp_path / "nowhere")])  # nothing nearby
    prepare(["cityscapes", "--root", str(root)])  # what it says works


def test_zips_extracted_into_folders_of_their_own_name_the_move(tmp_path):
    """leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip each extracted into a folder
    named after it: was a hint to pass --root=<root>/leftImg8bit_trainvaltest, whose images
    have no labels there (the next error); given that folder, "image ... has no label"."""
    tree = make_cityscapes(tmp_path / "tree")
    root = tmp_path / "cityscapes"
    for name, folder in (("leftImg8bit", "leftImg8bit_trainvaltest"),
                         ("gtFine", "gtFine_trainvaltest")):
        (root / folder).mkdir(parents=True)
        (tree / name).rename(root / folder / name)
    images, labels = root / "leftImg8bit_trainvaltest", root / "gtFine_trainvaltest"
    for given, move in ((root, f"{images}/leftImg8bit {labels}/gtFine {root}/"),
                        (images, f"{labels}/gtFine {images}/")):
        message = (f"cityscapes: leftImg8bit/ lies in {images}, gtFine/ in {labels} (each zip "
                   f"extracted into a folder of its own); the root must hold both: `mv {move}`")
        with pytest.raises(DataError) as error:
            CityscapesDataModule(root=str(given)).checked_pairs("train")
        assert str(error.value) == message
        with pytest.raises(DataError) as error:
            prepare(["cityscapes", "--root", str(given)])
        assert str(error.value) == message
    for name, folder in (("leftImg8bit", images), ("gtFine", labels)):  # as it says
        (folder / name).rename(root / name)
    prepare(["cityscapes", "--root", str(root)])


def test_a_folder_nearby_with_images_but_no_labels_is_not_offered_as_the_root(tmp_path,
                                                                              capsys):
    """Only leftImg8bit downloaded, one level below the root: was "pass
    --data.init_args.root=<it>", which fails next for want of labels."""
    tree = make_cityscapes(tmp_path / "cityscapes")
    (tree / "gtFine").rename(tmp_path / "elsewhere")
    with pytest.raises(DataError) as error:
        CityscapesDataModule(root=str(tmp_path)).checked_pairs("train")
    assert str(error.value).startswith(f"cityscapes: image folder {tmp_path}/leftImg8bit/train "
                                       "is missing.\nExpected under")


def test_prepare_writes_train_ids_equal_to_on_the_fly_mapping(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    module = CityscapesDataModule(root=str(root))
    before = [module.read_label(label) for _, label in module.checked_pairs("train")]
    prepare(["cityscapes", "--root", str(root)])
    pairs = module.checked_pairs("train")
    assert all(label.name.endswith("_gtFine_labelTrainIds.png") for _, label in pairs)
    for (_, label), expected in zip(pairs, before):
        np.testing.assert_array_equal(module.read_label(label), expected)
    # Scored splits keep reading labelIds, as the official evaluation: a labelTrainIds file
    # that disagrees with them (a resampled copy) does not change a score.
    val = module.checked_pairs("val")
    assert all(label.name.endswith("_gtFine_labelIds.png") for _, label in val)
    assert all(label is None for _, label in module.checked_pairs("test"))
    # Scoring the unlabelled test split would log NaN: it stops, pointing at validate / predict.
    with pytest.raises(DataError, match=r"split 'test' has no labels .* `dilatedseg predict "
                                        r"--data.init_args.predict_split=test"):
        module.check_files("test")
    module.check_files("predict")  # predicting it is fine


def test_cityscapes_fit_and_validate_log_category_iou(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    runs = tmp_path / "runs"
    run_cli("fit", *tiny_args("cityscapes", root, runs, "--model.tile_size=[16,32]",
                              "--data.init_args.crops_per_image=2"))
    metrics = logged_metrics(runs / "cityscapes/frontend/version_0")
    assert_scored(metrics, CLASSES)
    categories = {key: value for key, value in metrics.items() if key.startswith("val/catIoU/")}
    assert categories and {key.split("/")[2] for key in categories} <= set(CATEGORIES)
    assert metrics["val/mIoU_category"] == pytest.approx(
        sum(categories.values()) / len(categories), abs=1e-3)


def test_training_batches_carry_the_context_margin_around_their_labels(tmp_path):
    """The recipe's crops: images 2 x margin larger than their labels (628 around 256 for
    VGG-16; here 32 + 2 x 23 for the tiny front-end); validation images stay whole."""
    root = make_cityscapes(tmp_path / "cityscapes")
    module = CityscapesDataModule(root=str(root), crop_size=32, context_margin=23,
                                  batch_size=2, num_workers=0)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert tuple(batch["image"].shape) == (2, 3, 78, 78)
    assert batch["image"].dtype == torch.uint8  # a quarter of float32's bytes to move
    assert tuple(batch["label"].shape) == (2, 32, 32)
    assert batch["label"].dtype == torch.uint8  # an eighth of int64's
    val = next(iter(module.val_dataloader()))
    assert val["image"].shape[-2:] == val["label"].shape[-2:]


def test_several_crops_per_decoded_image(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    module = CityscapesDataModule(root=str(root), crop_size=32, context_margin=23,
                                  batch_size=4, crops_per_image=2, num_workers=0)
    module.setup("fit")
    loader = module.train_dataloader()
    assert len(loader) == len(module.datasets["train"]) // 2  # 2 images x 2 crops a batch
    batch = next(iter(loader))
    assert tuple(batch["image"].shape) == (4, 3, 78, 78)
    assert tuple(batch["label"].shape) == (4, 32, 32)
    names = batch["name"]
    assert names[0] == names[1] and names[2] == names[3] and names[0] != names[2]
    # Two independent random crops of the same image (the chance that they coincide in
    # position and flip is negligible for these sizes).
    assert not torch.equal(batch["image"][0], batch["image"][1])
    with pytest.raises(ValueError, match="crops_per_image must divide batch_size"):
        CityscapesDataModule(root=str(root), crop_size=32, batch_size=4, crops_per_image=3)
    with pytest.raises(ValueError, match="scale_range without a crop_size .* do not batch"):
        CityscapesDataModule(root=str(root), batch_size=4, scale_range=(0.75, 1.25))
    with pytest.raises(ValueError, match=r"crop_size must be positive, got \[32\]"):
        CityscapesDataModule(root=str(root), crop_size=[32])  # (was: a TypeError in setup)


@pytest.mark.skipif(not REALDATA.is_dir(), reason="no real Cityscapes files here")
def test_real_cityscapes_labels_map_like_the_official_train_ids(tmp_path):
    for folder in ("leftImg8bit", "gtFine"):
        os.symlink(REALDATA / folder, tmp_path / folder)
    module = CityscapesDataModule(root=str(tmp_path), num_workers=0)
    (image, label), = module.checked_pairs("val")
    assert label.name.endswith("_labelIds.png")  # what the official evaluation reads
    official = np.asarray(Image.open(
        label.with_name(label.name.replace("labelIds", "labelTrainIds"))))  # shipped train ids
    # The sample files were downscaled one by one, so a few boundary pixels disagree.
    assert (module.read_label(label) == official).mean() > 0.995
    module.setup("validate")
    sample = module.datasets["val"][0]
    assert tuple(sample["image"].shape) == (3, 128, 256)
