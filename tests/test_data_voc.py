"""Pascal VOC 2012 + SBD: the converter, the data module and a short CLI run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from conftest import run_cli
from fixtures_datasets import REPO, assert_scored, logged_metrics, make_voc, tiny_args
from PIL import Image

from dilatedseg.data import DataError, VOCDataModule
from dilatedseg.data.voc import CLASSES
from dilatedseg.prepare import main as prepare

REALDATA = Path("/work/shared/realdata/voc")


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    root = make_voc(tmp_path_factory.mktemp("voc"))
    prepare(["voc", "--root", str(root)])
    return root


def test_prepare_converts_sbd_and_writes_train_aug(voc_root):
    voc = voc_root / "VOCdevkit/VOC2012"
    names = (voc / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    # VOC train + SBD train + SBD val, minus VOC val (2007_000004 is in SBD train and VOC val).
    assert names == ["2007_000001", "2007_000002", "2007_000003", "2008_000001", "2008_000002",
                     "2008_000003"]
    mat = scipy.io.loadmat(voc_root / "benchmark_RELEASE/dataset/cls/2008_000002.mat")
    png = Image.open(voc / "SegmentationClassAug/2008_000002.png")
    assert png.mode == "P" and png.getpalette()[3:6] == [128, 0, 0]  # VOC colour map
    np.testing.assert_array_equal(np.asarray(png), mat["GTcls"]["Segmentation"][0, 0])
    assert (voc / "JPEGImages/2008_000002.jpg").is_file()  # SBD-only image copied over

    module = VOCDataModule(root=str(voc_root))
    pairs = dict((image.stem, label) for image, label in module.checked_pairs("train"))
    assert pairs["2007_000001"].parent.name == "SegmentationClass"  # VOC's own label wins
    assert pairs["2008_000001"].parent.name == "SegmentationClassAug"
    assert len(module.checked_pairs("val")) == 2
    module.setup("fit")
    sample = module.datasets["val"][0]
    values = set(np.unique(sample["label"].numpy()).tolist())
    assert 255 in values and values - {255} <= set(range(21))  # 255 borders kept as ignore



def test_prepare_of_a_root_one_level_off_names_the_folder_that_holds_voc(tmp_path):
    """Was only "VOCdevkit/VOC2012/JPEGImages is missing" and, as the fix, the command that
    had just failed."""
    root = make_voc(tmp_path / "voc")
    for wrong in (tmp_path, root / "VOCdevkit"):
        with pytest.raises(DataError, match=f"JPEGImages is missing .*, but {root} holds the "
                                            f"voc tree: pass --root={root}$"):
            prepare(["voc", "--root", str(wrong)])
    prepare(["voc", "--root", str(root)])  # what it says works


def test_without_sbd_fit_and_prepare_name_training_on_voc_alone(tmp_path, capsys):
    """VOC 2012 without SBD: was "train_aug.txt is missing ... Prepare it with: dilatedseg
    prepare voc", and prepare then stopped for want of SBD, neither naming train_split=train
    (VOC alone, nothing to prepare). With DeepLab's train_aug.txt and SegmentationClassAug/
    in place of SBD, prepare keeps and checks them."""
    root = make_voc(tmp_path / "voc", sbd_train=(), sbd_val=())
    shutil.rmtree(root / "benchmark_RELEASE")
    with pytest.raises(DataError, match=r"train_aug.txt is missing \(SBD's list, written by "
                                        r"prepare from SBD, which is not under the root either: "
                                        r"download SBD into the root and prepare it, or train on "
                                        r"VOC 2012 train alone with --data.init_args.train_split="
                                        r"train\)"):
        VOCDataModule(root=str(root)).check_data("fit")
    with pytest.raises(DataError, match=r"benchmark_RELEASE/dataset/cls is missing \(.*; without "
                                        r"SBD, train on VOC 2012 train alone with --data.init_args"
                                        r".train_split=train, which needs no prepare\)"):
        prepare(["voc", "--root", str(root)])
    VOCDataModule(root=str(root), train_split="train", batch_size=2).check_data("fit")  # as said

    voc = root / "VOCdevkit/VOC2012"  # DeepLab's copy: image and label paths per line
    (voc / "SegmentationClassAug").mkdir()
    lines = []
    for name in ("2007_000001", "2007_000002"):
        shutil.copy(voc / "SegmentationClass" / f"{name}.png", voc / "SegmentationClassAug")
        lines.append(f"/JPEGImages/{name}.jpg /SegmentationClassAug/{name}.png")
    listing = voc / "ImageSets/Segmentation/train_aug.txt"
    listing.write_text("\n".join(lines) + "\n")
    prepare(["voc", "--root", str(root)])
    assert "voc ready under" in capsys.readouterr().out
    assert listing.read_text() == "\n".join(lines) + "\n"  # kept as it was
    spoil = voc / "SegmentationClass/2007_000002.png"  # (VOC's own label comes first)
    values = np.asarray(Image.open(spoil)).copy()
    values[0, 0] = 40
    Image.fromarray(values).save(spoil)
    with pytest.raises(DataError, match="2007_000002.png holds values \\[40\\]"):  # checked
        prepare(["voc", "--root", str(root)])


def test_mean_pixel_is_the_papers_in_rgb_order():
    """REFERENCE sec. 3: VOC's mean pixel is BGR 102.93 111.36 116.52; the model takes RGB."""
    assert VOCDataModule.mean_rgb == (116.52, 111.36, 102.93)


@pytest.mark.parametrize("content", [b"", b"MATLAB 7.3 MAT-file" + bytes(200), b"garbage"])
def test_unreadable_sbd_mat_is_one_clear_error(tmp_path, content, capsys):
    """Empty, MATLAB v7.3 (HDF5) or garbage .mat files: a DataError naming the file."""
    root = make_voc(tmp_path / "voc", sbd_val=())
    bad = root / "benchmark_RELEASE/dataset/cls/2008_000001.mat"
    bad.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("prepare", "voc", "--root", str(root))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"cannot read SBD label {bad}" in err and "Traceback" not in err
    assert not list(root.rglob("*.partial.png"))


def test_voc_test_split_is_the_test_release_when_there(tmp_path):
    """Without the test release, `test` scores val; with it (test.txt and its JPEGs), `test` is
    those unlabelled images: predict_split=test predicts them and `dilatedseg test` stops."""
    root = make_voc(tmp_path / "voc")
    module = VOCDataModule(root=str(root))
    assert module.checked_pairs("test", labelled=True) == module.checked_pairs("val")
    voc = root / "VOCdevkit/VOC2012"
    for name in ("2009_000001", "2009_000002"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(voc / f"JPEGImages/{name}.jpg")
    (voc / "ImageSets/Segmentation/test.txt").write_text("2009_000001\n2009_000002\n")
    assert module.checked_pairs("test") == [(voc / f"JPEGImages/2009_00000{i}.jpg", None)
                                            for i in (1, 2)]
    with pytest.raises(DataError, match="split 'test' has no labels"):
        module.checked_pairs("test", labelled=True)


def test_voc_train_split_without_sbd(voc_root):
    module = VOCDataModule(root=str(voc_root), train_split="train")
    assert [i.stem for i, _ in module.checked_pairs("train")] == [
        "2007_000001", "2007_000002", "2007_000003"]


def test_deeplab_two_column_train_aug_list(voc_root):
    """DeepLab's widely copied train_aug.txt lists image and label paths per line."""
    listing = voc_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train_aug.txt"
    listing.write_text("/JPEGImages/2007_000002.jpg /SegmentationClassAug/2007_000002.png\n"
                       "/JPEGImages/2007_000003.jpg /SegmentationClassAug/2007_000003.png\n\n")
    pairs = VOCDataModule(root=str(voc_root)).checked_pairs("train")
    voc = voc_root / "VOCdevkit/VOC2012"
    assert pairs == [(voc / f"JPEGImages/{name}.jpg", voc / f"SegmentationClass/{name}.png")
                     for name in ("2007_000002", "2007_000003")]


def test_voc_fit_and_validate_through_cli(voc_root, tmp_path):
    runs = tmp_path / "runs"
    run_cli("fit", *tiny_args("voc", voc_root, runs))
    run_dir = runs / "voc/frontend/version_0"
    metrics = logged_metrics(run_dir)
    assert_scored(metrics, CLASSES)
    assert "train/loss" in metrics
    run_cli("validate", *tiny_args("voc", voc_root, runs),
            f"--ckpt_path={run_dir / 'checkpoints/last.ckpt'}")
    validated = logged_metrics(runs / "voc/frontend/validate_0")
    assert_scored(validated, CLASSES)
    assert validated["val/mIoU"] == pytest.approx(metrics["val/mIoU"], abs=1e-3)  # same weights
    # The data module's mean pixel reaches the model (the CLI links it), so it is saved too.
    saved = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)
    assert tuple(saved["hyper_parameters"]["pixel_mean"]) == (116.52, 111.36, 102.93)
    # The paper's context stage on top: Large module, cached front-end logits, batch from the
    # overlay shrunk back to a tiny run.
    run_cli("fit", *tiny_args("voc", voc_root, runs,
                              "--config", str(REPO / "conf/stage/context.yaml"),
                              "--config", str(REPO / "conf/voc/context.yaml"),
                              "--trainer.max_steps=-1", "--data.init_args.batch_size=2",
                              "--model.lr=0.001"))
    context = logged_metrics(runs / "voc/context/version_0")
    assert_scored(context, CLASSES)
    assert "train/loss" in context
    assert any((runs / "voc/cache").iterdir())  # trained on cached front-end logits


@pytest.mark.skipif(not REALDATA.is_dir(), reason="no real VOC files here")
def test_real_voc_files_load_and_evaluate(tmp_path):
    import lightning as L

    from dilatedseg.module import SegmentationModule

    voc = tmp_path / "VOCdevkit/VOC2012"
    names = sorted(p.stem for p in (REALDATA / "JPEGImages").glob("*.jpg"))
    for folder in ("JPEGImages", "SegmentationClass"):
        (voc / folder).mkdir(parents=True)
        for path in (REALDATA / folder).iterdir():
            os.symlink(path, voc / folder / path.name)
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(names))
    data = VOCDataModule(root=str(tmp_path), num_workers=0)
    data.setup("validate")
    sample = data.datasets["val"][0]
    assert sample["image"].shape[0] == 3 and sample["image"].shape[1:] == sample["label"].shape
    # Palette indices are the class ids, borders stay 255, in the files' class order.
    listed = (REALDATA / "class_names.txt").read_text().split("\n")
    assert [n.replace(" ", "").replace("/", "") for n in listed[1:21]] == list(data.classes[1:])
    for index, name in enumerate(names):
        with Image.open(REALDATA / "SegmentationClass" / f"{name}.png") as png:
            assert png.mode == "P"
            indices = np.asarray(png)
        label = data.datasets["val"][index]["label"].numpy()
        assert np.array_equal(label, indices)
        assert set(np.unique(label)) - {255} and set(np.unique(label)) <= set(range(21)) | {255}
    model = SegmentationModule(21, list(data.classes), arch="tiny", padding="valid",
                               pixel_mean=data.mean_rgb)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    result = trainer.validate(model, datamodule=data, verbose=False)[0]
    assert_scored(result, data.classes)
