"""KITTI: Ros et al. colour labels, the semantic benchmark's label ids, a short CLI run."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli
from fixtures_datasets import (
    assert_scored,
    logged_metrics,
    make_kitti_ros,
    make_kitti_semantics,
    tiny_args,
)
from PIL import Image

from dilatedseg.data import DataError, KITTIDataModule, camvid, cityscapes
from dilatedseg.prepare import main as prepare


def test_ros_colour_labels_decode_to_camvid_classes(tmp_path):
    root = make_kitti_ros(tmp_path / "kitti")
    module = KITTIDataModule(root=str(root))
    assert module.classes == camvid.CLASSES and module.num_classes == 11
    assert len(module.checked_pairs("train")) == 4 and len(module.checked_pairs("val")) == 2
    # Ros et al.'s test images (the paper's 46) are labelled: `dilatedseg test` scores them.
    assert module.checked_pairs("test", labelled=True) == module.checked_pairs("val")
    image, label_path = module.checked_pairs("train")[0]
    colours = np.asarray(Image.open(label_path).convert("RGB"))
    label = module.read_label(label_path)
    for index, colour in enumerate(camvid.PALETTE):
        assert ((colours == colour).all(-1) == (label == index)).all()
    assert (label[(colours == 0).all(-1)] == 255).all()


# Ros et al.'s 11 classes + void and their label colours, as the dataset_loaders KITTI loader
# (fvisin/dataset_loaders, images/kitti.py, _cmap / _mask_labels) reads their GT/ PNGs, with
# the class of the paper's CamVid order each is (vegetation = tree, cyclist = bicyclist).
ROS_PUBLISHED = (
    ("Sky", (128, 128, 128), "sky"),
    ("Building", (128, 0, 0), "building"),
    ("Road", (128, 64, 128), "road"),
    ("Sidewalk", (0, 0, 192), "sidewalk"),
    ("Fence", (64, 64, 128), "fence"),
    ("Vegetation", (128, 128, 0), "tree"),
    ("Pole", (192, 192, 128), "pole"),
    ("Car", (64, 0, 128), "car"),
    ("Sign", (192, 128, 128), "sign"),
    ("Pedestrian", (64, 64, 0), "pedestrian"),
    ("Cyclist", (0, 128, 192), "bicyclist"),
    ("void", (0, 0, 0), None),
)
# The authors' Dilation7 KITTI model's output palette, class by class (fyu/dilation,
# datasets/kitti.json): CamVid's, in the paper's CamVid order.
DILATION7_KITTI_PALETTE = (
    (128, 0, 0), (128, 128, 0), (128, 128, 128), (64, 0, 128), (192, 128, 128), (128, 64, 128),
    (64, 64, 0), (64, 64, 128), (192, 192, 128), (0, 0, 192), (0, 128, 192),
)


def test_ros_layout_is_the_published_kitti_semantic_tree(tmp_path):
    """Ros et al.'s archive: Training_00/ and Validation_07/, RGB/ beside GT/ (was an invented
    train/images, train/labels tree that no copy of the dataset has)."""
    root = make_kitti_ros(tmp_path / "KITTI_SEMANTIC")
    module = KITTIDataModule(root=str(root))
    for split, folder in (("train", "Training_00"), ("val", "Validation_07")):
        for image, label in module.checked_pairs(split):
            assert (image.parent, label) == (root / folder / "RGB", root / folder / "GT" /
                                             image.name)


def test_ros_colours_and_classes_are_the_published_ones(tmp_path):
    assert KITTIDataModule.palette == DILATION7_KITTI_PALETTE
    colours = np.array([[colour for _, colour, _ in ROS_PUBLISHED]], np.uint8)
    Image.fromarray(colours).save(tmp_path / "000000.png")
    assert KITTIDataModule().read_label(tmp_path / "000000.png")[0].tolist() == [
        255 if name is None else camvid.CLASSES.index(name) for _, _, name in ROS_PUBLISHED]


def test_semantics_maps_all_34_label_ids_as_cityscapesscripts_does(tmp_path):
    """The KITTI semantics devkit: labels are Cityscapes label ids (its labels.py)."""
    from cityscapesscripts.helpers.labels import labels

    official = {label.id: label.trainId for label in labels if label.id >= 0}
    ids = np.array([sorted(official)], np.uint8)
    Image.fromarray(ids, mode="L").save(tmp_path / "000000_10.png")
    mapped = KITTIDataModule(layout="semantics").read_label(tmp_path / "000000_10.png")
    assert len(official) == 34
    assert mapped[0].tolist() == [official[i] if 0 <= official[i] < 255 else 255
                                  for i in sorted(official)]


def test_mean_pixel_is_the_papers_in_rgb_order():
    """REFERENCE sec. 3: BGR 96.19 95.55 91.35, whichever layout; the model takes RGB."""
    assert KITTIDataModule.mean_rgb == (91.35, 95.55, 96.19)
    assert KITTIDataModule(layout="semantics").mean_rgb == (91.35, 95.55, 96.19)


def test_semantics_layout_uses_cityscapes_train_ids(tmp_path):
    root = make_kitti_semantics(tmp_path / "kitti")
    module = KITTIDataModule(root=str(root), layout="semantics", val_every=5)
    assert module.classes == cityscapes.CLASSES and module.num_classes == 19
    assert module.categories == cityscapes.CATEGORIES
    val = [image.name for image, _ in module.checked_pairs("val")]
    assert val == ["000004_10.png", "000009_10.png"]
    assert len(module.checked_pairs("train")) == 8
    assert module.checked_pairs("test")[0][1] is None  # testing/: no public labels
    with pytest.raises(DataError, match="kitti: split 'test' has no labels"):
        module.check_files("test")
    _, label_path = module.checked_pairs("train")[0]
    ids = np.asarray(Image.open(label_path))
    np.testing.assert_array_equal(module.read_label(label_path),
                                  cityscapes.train_id_lookup()[ids])


def test_kitti_fit_through_cli_both_layouts(tmp_path):
    runs = tmp_path / "runs"
    run_cli("fit", *tiny_args("kitti", make_kitti_ros(tmp_path / "ros"), runs))
    assert_scored(logged_metrics(runs / "kitti/frontend/version_0"), camvid.CLASSES)
    run_cli("fit", *tiny_args("kitti", make_kitti_semantics(tmp_path / "sem"), runs,
                              "--data.init_args.layout=semantics"), )
    metrics = logged_metrics(runs / "kitti/frontend/version_1")
    assert_scored(metrics, cityscapes.CLASSES)
    # Cityscapes categories linked in: their mean is the mean of the categories logged
    categories = [value for key, value in metrics.items() if key.startswith("val/catIoU/")]
    assert categories and {key.split("/")[2] for key in metrics
                           if key.startswith("val/catIoU/")} <= set(cityscapes.CATEGORIES)
    assert metrics["val/mIoU_category"] == pytest.approx(sum(categories) / len(categories),
                                                         abs=1e-3)
    assert not any(key.startswith("val/catIoU/") for key in logged_metrics(
        runs / "kitti/frontend/version_0"))  # CamVid's classes have no categories


def test_missing_data_names_the_prepare_command_for_the_layout(tmp_path):
    """The message's prepare command carries --layout only where it is not the default."""
    with pytest.raises(DataError, match=r"prepare kitti --root \S+ --layout semantics$"):
        KITTIDataModule(root=str(tmp_path), layout="semantics").checked_pairs("train")
    with pytest.raises(DataError, match=r"prepare kitti --root \S+$"):
        KITTIDataModule(root=str(tmp_path)).checked_pairs("train")
    with pytest.raises(ValueError, match=r"kitti layout must be one of \['ros', 'semantics'\]"):
        KITTIDataModule(layout="semantic")
    with pytest.raises(ValueError, match="val_every must be >= 2"):
        KITTIDataModule(layout="semantics", val_every=1)


def test_semantic_benchmark_read_with_the_default_layout_names_the_layout(tmp_path):
    root = make_kitti_semantics(tmp_path / "data_semantics")
    with pytest.raises(DataError, match=f"^kitti: image folder {root}/Training_00/RGB is "
                                        f"missing, but {root} holds the kitti tree of layout "
                                        "semantics: pass --data.init_args.layout=semantics$"):
        KITTIDataModule(root=str(root)).checked_pairs("train")


def test_prepare_names_its_own_options_for_the_folder_that_holds_the_tree(tmp_path):
    """`dilatedseg prepare` takes --root / --layout: it said "pass --data.init_args.root=...",
    which prepare refuses."""
    ros = make_kitti_ros(tmp_path / "kitti" / "KITTI_SEMANTIC")
    with pytest.raises(DataError, match=f"but {ros} holds the kitti tree: pass --root={ros}$"):
        prepare(["kitti", "--root", str(ros.parent)])
    semantics = make_kitti_semantics(tmp_path / "data_semantics")
    with pytest.raises(DataError, match=f"but {semantics} holds the kitti tree of layout "
                                        "semantics: pass --layout=semantics$"):
        prepare(["kitti", "--root", str(semantics)])
    prepare(["kitti", "--root", str(ros)])  # what the message says works
    prepare(["kitti", "--root", str(semantics), "--layout=semantics"])


def test_semantics_with_fewer_images_than_val_every_names_val_every(tmp_path):
    """A few files of the semantic benchmark (every 5th held out for validation): was "no
    images found for split 'val'" and a listing of the tree, from fit and prepare alike."""
    root = make_kitti_semantics(tmp_path / "kitti", count=4)
    images = root / "training" / "image_2"
    message = (f"kitti: {images} holds 4 image(s); every 5th (val_every) is held out for "
               "validation, so none would be: lower {}val_every (at least 2), or add images")
    with pytest.raises(DataError) as error:
        KITTIDataModule(root=str(root), layout="semantics").check_data("fit")
    assert str(error.value) == message.format("--data.init_args.")
    with pytest.raises(DataError) as error:
        prepare(["kitti", "--root", str(root), "--layout", "semantics"])
    assert str(error.value) == message.format("--")
    prepare(["kitti", "--root", str(root), "--layout", "semantics", "--val_every=2"])  # as said
    module = KITTIDataModule(root=str(root), layout="semantics", val_every=2)
    assert len(module.checked_pairs("train")) == len(module.checked_pairs("val")) == 2


def test_semantics_predictions_are_written_back_as_label_ids():
    """The KITTI benchmark takes Cityscapes label ids, as the Cityscapes server does."""
    module = KITTIDataModule(layout="semantics")
    assert (module.submission_ids == cityscapes.label_id_lookup()).all()
    assert getattr(KITTIDataModule(), "submission_ids", None) is None
