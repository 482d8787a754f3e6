"""Bad data fails before training with one clear message (path, expected tree, prepare command),
exit code 2 and no traceback, also when the error comes from a DataLoader worker."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from conftest import run_cli, shapes_args, untrained_checkpoint
from fixtures_datasets import (
    make_camvid_segnet,
    make_cityscapes,
    make_kitti_semantics,
    make_voc,
    tiny_args,
)
from PIL import Image

from dilatedseg.cli import DilatedSegCLI
from dilatedseg.data import CityscapesDataModule, DataError, KITTIDataModule
from dilatedseg.data.base import read_index_png


@pytest.fixture
def voc(tmp_path):
    return make_voc(tmp_path / "voc", voc_train=("a1", "a2"), voc_val=("b1",), sbd_train=(),
                    sbd_val=())


def fails(capsys, *argv: str) -> str:
    """Run the CLI, expect exit code 2; return stderr."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err
    return err


def voc_fit(root, tmp_path, *extra):
    return ("fit", *tiny_args("voc", root, tmp_path / "runs", "--data.init_args.train_split=train",
                              *extra))


@pytest.fixture
def model_never_built(monkeypatch):
    """The CLI building its model (which fetches ImageNet VGG-16 weights, ~530 MB), data
    module and trainer (which starts W&B) fails the test: bad data must stop it before."""
    def instantiate_classes(cli):
        raise AssertionError("the model and trainer were built (ImageNet weights fetched) "
                             "before the data was checked")

    monkeypatch.setattr(DilatedSegCLI, "instantiate_classes", instantiate_classes)


def spoil_label(path, value: int = 40):
    """Write ``value`` (no class, not 255) into one pixel of label ``path``."""
    values = np.asarray(Image.open(path)).copy()
    values[0, 0] = value
    Image.fromarray(values, mode="L").save(path)
    return path


def test_missing_root(tmp_path, capsys):
    err = fails(capsys, *voc_fit(tmp_path / "nowhere", tmp_path))
    assert f"dataset root {tmp_path / 'nowhere'} does not exist" in err
    assert "VOCdevkit/VOC2012/JPEGImages/<name>.jpg" in err  # the expected tree
    assert f"dilatedseg prepare voc --root {tmp_path / 'nowhere'}" in err
    assert "Download: http://host.robots.ox.ac.uk/pascal/VOC/voc2012/" in err  # where from


@pytest.mark.parametrize("root", [".", "voc/VOCdevkit", "voc/VOCdevkit/VOC2012"])
def test_root_one_level_off_names_the_root_that_holds_the_tree(voc, tmp_path, capsys, root):
    """Not only "prepare it there" (which would fail too): the folder that holds the tree."""
    err = fails(capsys, *voc_fit(tmp_path / root, tmp_path))
    assert err.splitlines()[-1].endswith(f"is missing, but {voc} holds the voc tree: pass "
                                         f"--data.init_args.root={voc}")
    assert len(err.splitlines()) == 1


def test_tree_of_the_other_layout_names_the_layout(tmp_path, capsys):
    root = make_camvid_segnet(tmp_path / "camvid")
    err = fails(capsys, "fit", *tiny_args("camvid", root, tmp_path / "runs",
                                          "--data.init_args.layout=original"))
    assert err.strip().endswith(f"but {root} holds the camvid tree of layout segnet: pass "
                                "--data.init_args.layout=segnet")

    # both off: the root one level too high and the other layout
    err = fails(capsys, "fit", *tiny_args("camvid", tmp_path, tmp_path / "runs",
                                          "--data.init_args.layout=original"))
    assert err.strip().endswith(f"but {root} holds the camvid tree of layout segnet: pass "
                                f"--data.init_args.root={root} --data.init_args.layout=segnet")


def test_missing_split_list(voc, tmp_path, capsys):
    (voc / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").unlink()
    err = fails(capsys, *voc_fit(voc, tmp_path))
    assert "ImageSets/Segmentation/val.txt is missing" in err and "Prepare it with" in err
    err = fails(capsys, "fit", *tiny_args("voc", voc, tmp_path / "runs"))  # no train_aug yet
    assert "train_aug.txt is missing (SBD's list, written by prepare)" in err


def test_empty_split_names_the_empty_list_or_folder(voc, tmp_path, capsys):
    """Was "no images found for split 'val'", which named neither."""
    listing = voc / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    listing.write_text("\n")
    err = fails(capsys, *voc_fit(voc, tmp_path))
    assert f"voc: split list {listing} is empty" in err
    root = make_camvid_segnet(tmp_path / "camvid", counts={"train": 2, "val": 0})
    err = fails(capsys, "fit", *tiny_args("camvid", root, tmp_path / "runs"))
    assert f"camvid: image folder {root / 'val'} holds no *.png images" in err


def test_image_without_label(voc, tmp_path, capsys, model_never_built):
    (voc / "VOCdevkit/VOC2012/SegmentationClass/a2.png").unlink()
    err = fails(capsys, *voc_fit(voc, tmp_path))
    assert "JPEGImages/a2.jpg has no label file" in err and "SegmentationClass/a2.png" in err


def test_size_mismatch(voc, tmp_path, capsys):
    Image.fromarray(np.zeros((10, 12), np.uint8), mode="L").save(
        voc / "VOCdevkit/VOC2012/SegmentationClass/b1.png")
    err = fails(capsys, *voc_fit(voc, tmp_path))
    assert "b1.jpg is 64x48 but its label" in err and "b1.png is 12x10" in err


def test_train_split_smaller_than_one_batch(voc, tmp_path, capsys, model_never_built):
    """Two images, batches of 4: an epoch would hold no full batch and train on nothing."""
    err = fails(capsys, *voc_fit(voc, tmp_path, "--data.init_args.batch_size=4"))
    assert "the 'train' split has 2 images, fewer than one batch of 4 per process" in err
    assert "lower --data.init_args.batch_size" in err
    assert not (tmp_path / "runs").exists()


def test_whole_images_of_different_sizes_do_not_batch(voc, tmp_path, capsys, model_never_built):
    for folder, suffix in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
        path = voc / f"VOCdevkit/VOC2012/{folder}/a2.{suffix}"
        with Image.open(path) as image:
            smaller = image.crop((0, 0, 40, 30))
        smaller.save(path)
    err = fails(capsys, *voc_fit(voc, tmp_path, "--data.init_args.crop_size=null"))
    assert "the 'train' images differ in size" in err and "a2.jpg 40x30" in err
    assert "set --data.init_args.crop_size, or --data.init_args.batch_size=1" in err
    assert not (tmp_path / "runs").exists()


def test_label_values_out_of_range(tmp_path, capsys, model_never_built):
    root = make_camvid_segnet(tmp_path / "camvid")
    path = spoil_label(next((root / "trainannot").iterdir()))
    err = fails(capsys, "fit", *tiny_args("camvid", root, tmp_path / "runs",
                                          "--model.pretrained=imagenet"))
    assert f"label {path} holds values [40] outside [0, 11)" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("stage,split", [("validate", "val"), ("test", "test"),
                                         ("predict", "val")])
def test_evaluated_label_values_are_checked_before_the_model_is_built(
        tmp_path, capsys, model_never_built, stage, split):
    """Each stage checks the splits it reads (predict: the labels its split has)."""
    root = make_camvid_segnet(tmp_path / "camvid")
    path = spoil_label(sorted((root / f"{split}annot").iterdir())[-1])
    spoil_label(next((root / "trainannot").iterdir()))  # not read: no error of it
    weights = untrained_checkpoint(tmp_path / "model.ckpt", 11, padding="valid")
    err = fails(capsys, stage, *tiny_args("camvid", root, tmp_path / "runs",
                                          f"--model.init_from={weights}"))
    assert f"label {path} holds values [40]" in err


def test_train_split_too_small_for_the_configured_processes(voc, tmp_path, capsys,
                                                           model_never_built):
    """--trainer.devices=2: two images cannot give two processes a batch of 2 each; found
    from the trainer config, before the model (and the 2 processes) start."""
    err = fails(capsys, *voc_fit(voc, tmp_path, "--trainer.accelerator=cpu",
                                 "--trainer.devices=2", "--trainer.strategy=ddp"))
    assert ("the 'train' split has 2 images, fewer than one batch of 2 per process "
            "(2 process(es))") in err


@pytest.mark.parametrize("stage", ["validate", "predict"])
def test_deploy_tiles_that_cannot_stitch_stop_before_the_model_is_built(
        voc, tmp_path, capsys, model_never_built, stage):
    """tile_whole_network with a width tile of 20 px (no multiple of 8): the 64 px wide
    images need several, found from their headers, not at the first one evaluated."""
    weights = untrained_checkpoint(tmp_path / "model.ckpt", 21, padding="valid")
    err = fails(capsys, stage, *tiny_args("voc", voc, tmp_path / "runs",
                                          f"--model.init_from={weights}",
                                          "--model.tile_size=[16,20]",
                                          "--model.tile_whole_network=true"))
    assert "error: tile_whole_network: a 48x64 image needs several tiles along its width, " \
           "whose tile size 20 px is not a multiple of 8" in err
    assert not (tmp_path / "runs").exists()


def test_without_the_cli_setup_and_loaders_still_check(voc):
    """From Python (no check_data first), setup reads the label values and the training
    loader checks the split's size against the batch."""
    from dilatedseg.data import VOCDataModule

    data = VOCDataModule(root=str(voc), train_split="train", batch_size=4, num_workers=0)
    data.setup("fit")  # labels are fine
    with pytest.raises(DataError, match="the 'train' split has 2 images, fewer than one "
                                        r"batch of 4 per process \(1 process"):
        data.train_dataloader()
    spoil_label(voc / "VOCdevkit/VOC2012/SegmentationClass/b1.png")
    with pytest.raises(DataError, match="b1.png holds values \\[40\\]"):
        data.setup("validate")


@pytest.mark.parametrize("extra", [(), ("--model.tile_size=[16,16]",
                                    "--model.tile_whole_network=true")])
@pytest.mark.parametrize("stage", ["validate", "predict"])
def test_data_checked_ahead_is_not_read_again(tmp_path, monkeypatch, stage, extra):
    """The CLI's check_data read the labels and image headers; setup and the loaders skip
    them (the count against the batch, which reads nothing, is checked again). Each image's
    header is read once, also where several checks need it (predict_dir's images, which must
    be images; mixed sizes in a batch; tile_whole_network's tiles)."""
    from collections import Counter

    from dilatedseg.data import base

    labels, headers = Counter(), Counter()
    check_labels, image_size = base.SegmentationDataModule.check_labels, base.image_size

    def count_labels(module, dataset):
        labels[len(dataset)] += 1
        return check_labels(module, dataset)

    def count_headers(path, *args, **kwargs):
        headers[path.name] += 1
        return image_size(path, *args, **kwargs)

    monkeypatch.setattr(base.SegmentationDataModule, "check_labels", count_labels)
    monkeypatch.setattr(base, "image_size", count_headers)
    root = make_voc(tmp_path / "voc2", voc_train=("a1", "a2"), voc_val=("b1", "b2"),
                    sbd_train=(), sbd_val=())
    weights = untrained_checkpoint(tmp_path / "model.ckpt", 21, padding="valid")
    folder = []
    if stage == "predict":
        shutil.copytree(root / "VOCdevkit/VOC2012/JPEGImages", tmp_path / "photos")
        folder = [f"--data.init_args.predict_dir={tmp_path / 'photos'}"]
    run_cli(stage, *tiny_args("voc", root, tmp_path / "runs",
                              "--data.init_args.val_batch_size=2",
                              f"--model.init_from={weights}", *folder, *extra))
    if stage == "validate":
        assert labels == {2: 1}  # val's 2 labels: checked once
        assert headers == {"b1.jpg": 1, "b2.jpg": 1}
    else:  # predict_dir: no labels
        assert not labels
        assert headers == {f"{name}.jpg": 1 for name in ("a1", "a2", "b1", "b2")}


def test_16_bit_label_values_above_255_are_named_not_wrapped(tmp_path):
    """A 16-bit PNG's 263 would wrap to class 7 as uint8: it is refused, naming the file."""
    path = tmp_path / "label.png"
    Image.fromarray(np.array([[0, 3], [263, 255]], np.uint16)).save(path)
    with pytest.raises(DataError, match=r"label .*label.png is a uint16 PNG holding values up "
                                        r"to 263; .* convert it to an 8-bit index PNG"):
        read_index_png(path)
    Image.fromarray(np.array([[0, 3], [7, 255]], np.uint16)).save(path)
    assert read_index_png(path).tolist() == [[0, 3], [7, 255]]  # in range: read as is
    big_endian = tmp_path / "label.tif"  # (a 16-bit TIFF opens as mode I;16B)
    Image.frombytes("I;16B", (2, 2), np.array([[0, 3], [7, 255]], ">u2").tobytes()).save(big_endian)
    assert read_index_png(big_endian).tolist() == [[0, 3], [7, 255]]

def test_colour_label_names_the_conversion(tmp_path):
    path = tmp_path / "label.png"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(path)
    with pytest.raises(DataError, match=r"label .*label.png is a RGB image; expected a "
                                        r"single-channel index PNG .*`dilatedseg prepare"):
        read_index_png(path)


def test_unreadable_image(voc, tmp_path, capsys):
    (voc / "VOCdevkit/VOC2012/JPEGImages/a1.jpg").write_bytes(b"not a jpeg")
    err = fails(capsys, *voc_fit(voc, tmp_path))
    assert "cannot read image" in err and "a1.jpg" in err
    # VOC's splits are lists of names: deleting the file alone would only trade this error for
    # "listed but missing", so the advice names the list too
    assert "re-download it" in err and "its line in the split list" in err


def test_crf_stage_without_a_crf_rnn_stops_before_training(voc, tmp_path, capsys):
    err = fails(capsys, *voc_fit(voc, tmp_path, "--model.stage=crf", "--model.crf=dense",
                                 "--model.init_from=null"))
    assert "stage 'crf' trains a CRF-RNN: set --model.crf=rnn" in err
    assert not (tmp_path / "runs").exists()


def test_predict_dir_images_that_would_write_one_file(voc, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for suffix in ("png", "jpg"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"street.{suffix}")
    err = fails(capsys, "predict", *tiny_args("voc", voc, tmp_path / "runs",
                                              f"--data.init_args.predict_dir={folder}"))
    assert "street.jpg and street.png would both be predicted to street.png" in err


def test_error_inside_a_dataloader_worker(voc, tmp_path, capsys):
    """predict_dir images are decoded only by the workers (their headers are read first: a
    file that is no image stops before the run): the message still comes out clean."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "notes.png").write_bytes(b"\x89PNG garbage")
    err = fails(capsys, "predict", *tiny_args("voc", voc, tmp_path / "runs",
                                              f"--data.init_args.predict_dir={folder}"))
    assert "cannot read image" in err and "notes.png" in err
    # a predict_dir's images have no label, split list or prepare command: the way out is theirs
    assert f"move it out of predict_dir {folder}" in err and "split list" not in err
    assert not (tmp_path / "runs").exists()
    (folder / "notes.png").unlink()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "broken.png")
    data = (folder / "broken.png").read_bytes()
    (folder / "broken.png").write_bytes(data[: len(data) // 2])  # a good header, cut short
    weights = untrained_checkpoint(tmp_path / "model.ckpt", 21, padding="valid")
    err = fails(capsys, "predict", *tiny_args("voc", voc, tmp_path / "runs",
                                              f"--data.init_args.predict_dir={folder}",
                                              "--data.init_args.num_workers=1",
                                              f"--model.init_from={weights}"))
    assert err.startswith("error: cannot read image") and "broken.png" in err
    assert "move it out of predict_dir" in err and "split list" not in err
    assert "DataLoader worker" not in err


def test_failed_start_leaves_no_run_directory_and_no_wandb_run(tmp_path, capsys):
    """Missing data is found before the trainer starts W&B (its default logger here); the run
    directory made for the run is taken back, since nothing was written into it."""
    args = [a for a in voc_fit(tmp_path / "nowhere", tmp_path) if "logger" not in a]
    err = fails(capsys, *args)
    assert "does not exist" in err and "wandb" not in err.lower()
    assert not (tmp_path / "runs").exists()


def test_failed_start_keeps_earlier_runs(voc, tmp_path, capsys):
    earlier = tmp_path / "runs" / "voc" / "frontend" / "version_0"
    (earlier / "checkpoints").mkdir(parents=True)
    (earlier / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (voc / "VOCdevkit/VOC2012/SegmentationClass/a2.png").unlink()
    fails(capsys, *voc_fit(voc, tmp_path))
    assert sorted(p.name for p in earlier.parent.iterdir()) == ["version_0"]
    assert (earlier / "checkpoints" / "last.ckpt").read_bytes() == b"weights"


def test_bad_option_value_is_one_line_not_a_traceback(voc, tmp_path, capsys):
    err = fails(capsys, *voc_fit(voc, tmp_path, "--model.optimizer=adamw"))
    assert "bad configuration: optimizer must be 'sgd' or 'adam', got 'adamw'" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("option,message", [
    ("--model.lrr=0.1", "unrecognized arguments: --model.lrr=0.1"),
    ("--trainer.max_epochs=abc", 'Parser key "trainer.max_epochs"'),
    ("--config=conf/nope.yaml", "File does not exist: "),
    ("--config={tmp}/empty.yaml", "a --config file holds no options: it is empty, only comm"),
])
def test_parse_error_is_the_message_not_the_usage(voc, tmp_path, capsys, option, message):
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    err = fails(capsys, *voc_fit(voc, tmp_path, option.format(tmp=tmp_path)))
    assert err.startswith("error: ") and message in err.splitlines()[0]
    assert err.strip().endswith("(the options: dilatedseg fit --help)")
    assert "usage:" not in err and len(err.splitlines()) < 10
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("option,message", [
    ("--data.init_args.crop_sise=64", "VOCDataModule has no option --data.init_args.crop_sise"),
    ("--data.init_args.batch_size=abc", 'Parser key "data.init_args.batch_size":'),
])
def test_data_option_parse_error_is_the_data_modules_problem(voc, tmp_path, capsys, option,
                                                             message):
    """A data option is one of a class given by class_path: jsonargparse's message lists every
    type --data could have, the problem buried inside. The problem alone comes out, with the
    --help that lists the data module's options."""
    err = fails(capsys, *voc_fit(voc, tmp_path, option))
    assert err.splitlines()[0] == f"error: {message}"
    assert err.strip().endswith("(the options: dilatedseg fit --data.help VOCDataModule)")
    assert "Union" not in err and len(err.splitlines()) <= 3


@pytest.mark.parametrize("value,fix", [
    ("voc", "pass --data=VOCDataModule, or the dataset's recipe: --config conf/voc.yaml"),
    ("pascal", "pass one of ShapesDataModule, VOCDataModule, CamVidDataModule, KITTIDataModule"),
])
def test_dataset_name_given_for_the_data_class(voc, tmp_path, capsys, value, fix):
    """--data takes the data module's class: a dataset's name there is named with the class
    (and recipe) to pass, not jsonargparse's report on each type --data could have."""
    err = fails(capsys, *voc_fit(voc, tmp_path, f"--data={value}"))
    assert err.startswith(f"error: --data={value} is not a data module class: {fix}")
    assert "Union" not in err and len(err.splitlines()) == 2
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("value,fix", [
    ("voc", "pass --data.help VOCDataModule\n"),
    ("pascal", "pass one of ShapesDataModule, VOCDataModule, CamVidDataModule, KITTIDataModule"),
])
def test_dataset_name_given_for_the_data_class_help(capsys, value, fix):
    """`--data.help voc` was jsonargparse's bare "Expected a dot import path string: voc"."""
    err = fails(capsys, "fit", "--data.help", value)
    assert err.startswith(f"error: --data.help {value} is not a data module class: {fix}")
    assert len(err.splitlines()) == 2


def test_context_margin_that_does_not_fit_the_front_end(voc, tmp_path, capsys):
    """The VGG-16 recipe's margin (186) with the tiny front-end (23): named, with the fix,
    before training."""
    err = fails(capsys, *voc_fit(voc, tmp_path, "--data.init_args.context_margin=186"))
    assert "carry 186 px of context" in err and "--data.init_args.context_margin=23" in err
    assert not (tmp_path / "runs").exists()  # found from the config, before anything ran


def test_bad_label_found_after_wandb_started_leaves_no_run(tiny_shapes, tmp_path, capsys):
    """The shapes dataset is written by prepare_data, so its labels are read in setup, after
    W&B (the default logger) started its run: the run directory, its W&B run and config.yaml
    are all taken back."""
    root = tmp_path / "shapes"
    shutil.copytree(tiny_shapes, root)
    spoil_label(root / "labels" / "val" / "val_00001.png")
    args = [a for a in shapes_args(root, tmp_path / "runs") if "logger" not in a]
    err = fails(capsys, "fit", *args)
    assert "holds values [40]" in err
    assert not (tmp_path / "runs").exists()


def fake_checkpoint(path, stage="frontend", classes=("a", "b", "c")):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": {"stage": stage, "class_names": list(classes)},
                "state_dict": {"model.w": torch.zeros(1)}}, path)
    return path


def test_checkpoint_that_does_not_exist(voc, tmp_path, capsys):
    missing = tmp_path / "runs/voc/frontend/version_9/checkpoints/last.ckpt"  # a typo
    err = fails(capsys, *voc_fit(voc, tmp_path, f"--ckpt_path={missing}"))
    assert f"checkpoint {missing} does not exist" in err
    assert not (tmp_path / "runs").exists()  # no version_9 made for it


def test_resuming_another_datasets_run_leaves_it_untouched(voc, tmp_path, capsys):
    run = tmp_path / "runs/shapes/frontend/version_0"
    last = fake_checkpoint(run / "checkpoints/last.ckpt", classes=[str(i) for i in range(21)])
    (run / "config.yaml").write_text("shapes run\n")
    err = fails(capsys, *voc_fit(voc, tmp_path, f"--ckpt_path={last}"))
    assert f"belongs to the run {run}, not to a voc / frontend run" in err
    assert f"--model.init_from={last}" in err
    assert (run / "config.yaml").read_text() == "shapes run\n"
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "config.yaml", "last.ckpt"]


def test_resuming_a_checkpoint_of_another_stage(voc, tmp_path, capsys):
    last = fake_checkpoint(tmp_path / "runs/voc/frontend/version_0/checkpoints/last.ckpt",
                           classes=[str(i) for i in range(21)])
    err = fails(capsys, *voc_fit(voc, tmp_path, "--config", "conf/stage/context.yaml",
                                 f"--ckpt_path={last}"))
    assert "checkpoint of stage 'frontend'" in err and "--config conf/stage/frontend.yaml" in err


def test_init_from_a_checkpoint_with_other_classes(voc, tmp_path, capsys):
    other = fake_checkpoint(tmp_path / "elsewhere.ckpt", classes=("x", "y", "z", "w"))
    err = fails(capsys, *voc_fit(voc, tmp_path, "--config", "conf/stage/context.yaml",
                                 f"--model.init_from={other}"))
    assert "was trained on 4 classes (x, y, z, w), but voc has 21" in err
    assert not (tmp_path / "runs").exists()


def test_init_from_a_front_end_of_the_other_padding(voc, tmp_path, capsys):
    """Same weight shapes, other geometry: it would load, then compute other logits (frozen,
    in the context stage). Stopped before anything runs, with the options to set."""
    same = untrained_checkpoint(tmp_path / "same.ckpt", 21, padding="same")
    err = fails(capsys, *voc_fit(voc, tmp_path, "--config", "conf/stage/context.yaml",
                                 f"--model.init_from={same}"))
    assert f"{same} holds a front-end trained with padding=same, but this model has " \
           "padding=valid: set --model.padding=same" in err
    assert "--data.init_args.context_margin=0" in err
    assert not (tmp_path / "runs").exists()


def test_evaluating_init_from_without_weights_for_the_context_module(voc, tmp_path, capsys):
    """validate with a front-end checkpoint as init_from in the context stage would score an
    untrained (identity) context module: refused, naming --ckpt_path, which rebuilds the model
    the checkpoint was trained as."""
    frontend = untrained_checkpoint(tmp_path / "frontend.ckpt", 21, padding="valid")
    err = fails(capsys, "validate", *voc_fit(voc, tmp_path, "--config", "conf/stage/context.yaml",
                                             f"--model.init_from={frontend}")[1:])
    assert f"{frontend} holds no weights that fit this model's context module (the " \
           "checkpoint has none)" in err and f"--ckpt_path={frontend}" in err
    assert not (tmp_path / "runs").exists()


def test_misspelled_crf_option_is_a_configuration_error(voc, tmp_path, capsys):
    err = fails(capsys, *voc_fit(voc, tmp_path, "--model.crf=dense",
                                 "--model.crf_options={theta_alpa: 80}"))
    assert "bad configuration: crf_options has no theta_alpa: its keys are bilateral_weight, " \
           "compatibility, iterations, spatial_weight, test_iterations, theta_alpha, " in err


def test_empty_predict_dir_stops_before_the_run(voc, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    args = [a for a in tiny_args("voc", voc, tmp_path / "runs",
                                 f"--data.init_args.predict_dir={tmp_path / 'empty'}")
            if "logger" not in a]
    err = fails(capsys, "predict", *args)
    assert "holds no .png / .jpg images" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("option,message", [
    ("--data.init_args.crop_size=-5", "crop_size must be positive, got -5"),
    ("--data.init_args.batch_size=0", "batch sizes must be >= 1"),
    ("--model.tile_size=-8", "tile_size must be at least 8 px"),
    ("--data.init_args.resize=0", "resize must be [height, width] in px"),
    ("--trainer.devices=abc", "`devices`"),  # refused by Lightning's Trainer
    ("--data.init_args.num_workers=-1", "num_workers must be >= 0"),
    ("--data.init_args.scale_range=[1.5,0.5]", "scale_range must be [low, high] with 0 < low"),
    ("--model.lr=-1", "need lr > 0, 0 <= momentum < 1"),
    ("--model.momentum=1.5", "need lr > 0, 0 <= momentum < 1"),
    ("--model.pixel_std=[0,0,0]", "pixel_mean and pixel_std take 3 values"),  # was: NaN
    ("--trainer.max_epochs=0", "--trainer.max_epochs=0 trains nothing"),  # was: an empty run
    ("--trainer.limit_train_batches=0", "--trainer.limit_train_batches=0 trains nothing"),
])
def test_sizes_that_cannot_work_are_configuration_errors(voc, tmp_path, capsys, option,
                                                         message):
    err = fails(capsys, *voc_fit(voc, tmp_path, option))
    assert f"bad configuration: {message}" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("content,message", [
    (b"not a checkpoint", "is not a PyTorch checkpoint torch.load can read"),
    ("tensor", "holds no state dict"),
    ("hparams-string", "its 'hyper_parameters' are not a dict"),
])
def test_init_from_that_is_not_a_checkpoint_is_named(voc, tmp_path, capsys, content, message):
    import torch

    path = tmp_path / "weights.ckpt"
    if content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "hparams-string":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "hyper_parameters": "lr=1"}, path)
    else:
        path.write_bytes(content)
    err = fails(capsys, *voc_fit(voc, tmp_path, f"--model.init_from={path}"))
    assert f"{path}" in err and message in err
    assert not (tmp_path / "runs").exists()


def test_evaluating_without_trained_weights_is_refused(voc, tmp_path, capsys):
    camvid = make_camvid_segnet(tmp_path / "camvid")
    for verb, args in (("validate", voc_fit(voc, tmp_path)[1:]),
                       ("test", tiny_args("camvid", camvid, tmp_path / "runs")),
                       ("predict", voc_fit(voc, tmp_path)[1:])):
        err = fails(capsys, verb, *args)
        assert f"{verb} needs trained weights: pass --ckpt_path=best (the best " in err
    assert not (tmp_path / "runs").exists()


def test_runs_dir_or_predict_output_that_is_a_file(voc, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    err = fails(capsys, *voc_fit(voc, tmp_path), f"--runs_dir={blocker}")
    assert f"{blocker} is a file, not a folder for runs" in err
    checkpoint = fake_checkpoint(tmp_path / "model.ckpt", classes=[str(i) for i in range(21)])
    err = fails(capsys, "predict", *voc_fit(voc, tmp_path)[1:], f"--ckpt_path={checkpoint}",
                f"--output={blocker}")
    assert f"--output={blocker} is a file" in err
    assert blocker.read_text() == "x" and not (tmp_path / "runs").exists()


def test_predict_output_holding_earlier_predictions_is_refused(voc, tmp_path, capsys):
    """A second predict into the same --output (another checkpoint, other images) would
    overwrite the first one's files and mix the rest in: refused before the run."""
    output = tmp_path / "predictions"
    (output / "index").mkdir(parents=True)
    (output / "index" / "b1.png").write_bytes(b"an earlier prediction")
    (output / "notes.txt").write_text("mine")
    checkpoint = fake_checkpoint(tmp_path / "model.ckpt", classes=[str(i) for i in range(21)])
    err = fails(capsys, "predict", *voc_fit(voc, tmp_path)[1:], f"--ckpt_path={checkpoint}",
                f"--output={output}")
    assert f"--output={output} already holds predictions (index/)" in err
    assert (output / "index" / "b1.png").read_bytes() == b"an earlier prediction"
    assert not (tmp_path / "runs").exists()


def test_image_over_pils_pixel_limit_is_a_data_error(tmp_path, monkeypatch):
    from dilatedseg.data.base import DataError, image_size, read_image, read_index_png

    path = tmp_path / "huge.png"
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 px is over twice the limit
    for reader in (read_image, read_index_png, image_size):
        with pytest.raises(DataError, match=f"cannot read .*{path.name}"):
            reader(path)


def test_dataset_root_that_is_a_file(tmp_path, capsys):
    root = tmp_path / "voc.tar"
    root.write_bytes(b"archive")
    err = fails(capsys, *voc_fit(root, tmp_path))
    assert f"dataset root {root} is a file, not the dataset's folder" in err


def test_checkpoint_alias_without_a_run(voc, tmp_path, capsys):
    err = fails(capsys, "validate", *voc_fit(voc, tmp_path)[1:], "--ckpt_path=best")
    assert f"--ckpt_path=best: no run under {tmp_path / 'runs'}/voc/frontend/ has a best" in err


def big_voc(root, count: int = 1001):
    """A VOC tree whose 'train' list holds ``count`` images (copies of one), over the
    1000 files up to which ``label_check: auto`` reads every label before training."""
    make_voc(root, voc_train=("a0",), voc_val=("b1", "b2"), sbd_train=(), sbd_val=())
    voc = root / "VOCdevkit/VOC2012"
    names = [f"a{i:04d}" for i in range(count)]
    for name in names:
        shutil.copy(voc / "JPEGImages/a0.jpg", voc / "JPEGImages" / f"{name}.jpg")
        shutil.copy(voc / "SegmentationClass/a0.png", voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(names) + "\n")
    return root


@pytest.mark.parametrize("label_check, count, read", [("auto", 1000, 1000), ("auto", 1001, 64),
                                                      ("all", 1001, 1001), ("sample", 100, 64)])
def test_label_check_reads_every_label_or_a_spread_sample(tmp_path, label_check, count, read):
    """auto: every label of a split of up to 1000 files, else 64 spread over it, first and
    last included."""
    from dilatedseg.data import VOCDataModule

    loaded = []
    data = VOCDataModule(root=str(big_voc(tmp_path / "voc", count)), train_split="train",
                         label_check=label_check)
    dataset = data.make_dataset("train", check=False)
    dataset.load = loaded.append
    data.check_labels(dataset)
    assert len(loaded) == read and len(set(loaded)) == read
    assert loaded[0] == 0 and loaded[-1] == count - 1


@pytest.mark.parametrize("damage", ["values", "size"])
def test_bad_label_the_sample_missed_stops_training_naming_it_and_the_fix(
        tmp_path, monkeypatch, capsys, damage):
    """label_check: auto reads 64 of the 1001 training labels first; a bad one among the
    others (a value no class has, or the wrong size) stops the run where it is loaded, in the
    second epoch here (in the main process, or in a dataloader worker): one message naming
    the file, the problem and how to check every label before training, the first epoch's
    last.ckpt kept and the resume advice given."""
    from dilatedseg.data.base import SegmentationDataset

    root = big_voc(tmp_path / "voc")
    loaded, load = tmp_path / "loaded.txt", SegmentationDataset.load

    def recording(dataset, index):  # (to a file: also from a dataloader worker)
        with open(loaded, "a") as record:
            record.write(f"{dataset.pairs[index][1].name}\n")
        return load(dataset, index)

    monkeypatch.setattr(SegmentationDataset, "load", recording)

    def fit(runs):
        loaded.write_text("")
        run_cli("fit", *tiny_args("voc", root, runs, "--data.init_args.train_split=train",
                                  "--trainer.max_epochs=2",
                                  f"--data.init_args.num_workers={int(damage == 'size')}"))
        return [name for name in loaded.read_text().split() if name.startswith("a")]  # train

    # where each training label is first read (seeded): 64 checked ahead, then 2 batches of
    # 2 an epoch (a worker reads 2 more ahead, left unused)
    train = fit(tmp_path / "clean")
    per_epoch = 8 if damage == "size" else 4
    assert len(train) == 64 + 2 * per_epoch
    earlier, first_batch = train[:64 + per_epoch], train[64 + per_epoch:][:2]
    bad = root / "VOCdevkit/VOC2012/SegmentationClass" / next(
        name for name in first_batch if name not in earlier)
    if damage == "values":
        spoil_label(bad, value=40)
        problem = f"label {bad} holds values [40] outside [0, 21) and not 255 (ignore)"
    else:
        Image.open(bad).resize((32, 24)).save(bad)
        problem = f"is 64x48 but its label {bad} is 32x24; they must match: replace the wrong one"
    with pytest.raises(SystemExit) as exit_info:
        fit(tmp_path / "runs")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err
    error = err[err.index("error: "):]
    assert problem in error
    assert ("(found as it loaded: label_check: auto read 64 of the 1001 files of split 'train' "
            "before training, and others may be damaged too: to find them all before training, "
            f"run `dilatedseg prepare voc --root {root}` or pass "
            "--data.init_args.label_check=all)") in error
    last = tmp_path / "runs/voc/frontend/version_0/checkpoints/last.ckpt"
    assert error.endswith("(the run stopped after it had started; once that is fixed, resume "
                          f"it with --ckpt_path={last})\n")
    assert torch.load(last, weights_only=True)["epoch"] == 0  # the first epoch's, kept


def kitti_testing(root):
    """Add the KITTI semantic benchmark's testing/image_2 (images, no labels)."""
    (root / "testing/image_2").mkdir(parents=True)
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(root / "testing/image_2/000000_10.png")


# dataset -> (its data module, its tree without the test split's images, the data options it
# reads with, the test images' folder or list as the missing-data error names it, a function
# adding them)
UNLABELLED_TEST = {
    "cityscapes": (CityscapesDataModule, lambda root: make_cityscapes(root, {"train": 2, "val": 1}),
                   {}, "image folder {root}/leftImg8bit/test is missing",
                   lambda root: make_cityscapes(root, {"test": 2})),
    "kitti": (KITTIDataModule,
              lambda root: shutil.rmtree(make_kitti_semantics(root, count=5) / "testing"),
              {"layout": "semantics"}, "image folder {root}/testing/image_2 is missing",
              kitti_testing),
}


@pytest.mark.parametrize("dataset", sorted(UNLABELLED_TEST))
def test_split_without_public_labels_stops_test_whatever_files_are_there(
        tmp_path, capsys, dataset):
    """`dilatedseg test` on a split whose labels are not public (Cityscapes', KITTI semantics'
    test; VOC's is val unless its test release is there: see tests/test_data_voc.py) stops
    first with the one error that says so and what to do instead, whether the root, or the
    split's images, are there or not: Cityscapes without leftImg8bit/test said that folder was
    missing, and once downloaded, that it had no labels. `predict` of that split needs its
    images: without them, that is its error; with them, it writes their predictions."""
    datamodule, make_tree, options, missing, add_images = UNLABELLED_TEST[dataset]
    root, runs = tmp_path / dataset, tmp_path / "runs"
    weights = untrained_checkpoint(tmp_path / "model.ckpt", 19, padding="valid")

    def run(root, stage, *extra):
        return tiny_args(dataset, root, runs, *(f"--data.init_args.{key}={value}"
                                                for key, value in options.items()),
                         f"--model.init_from={weights}", *extra)

    stops = (f"error: {dataset}: split 'test' has no labels (they are not public), so there is "
             "nothing to score: evaluate on 'val' with `dilatedseg validate`, or predict 'test' "
             "for the evaluation server with `dilatedseg predict "
             "--data.init_args.predict_split=test`")
    assert fails(capsys, "test", *run(tmp_path / "nowhere", "test")).strip() == stops
    make_tree(root)
    assert fails(capsys, "test", *run(root, "test")).strip() == stops
    err = fails(capsys, "predict", *run(root, "predict", "--data.init_args.predict_split=test"))
    assert missing.format(root=root) in err and "has no labels" not in err
    assert not runs.exists()

    add_images(root)
    assert fails(capsys, "test", *run(root, "test")).strip() == stops
    assert not runs.exists()
    run_cli("predict", *run(root, "predict", "--data.init_args.predict_split=test",
                            f"--output={tmp_path / 'out'}"))
    images = datamodule(root=str(root), **options).checked_pairs("test")
    assert images and all(label is None for _, label in images)
    assert len(list((tmp_path / "out/index").rglob("*.png"))) == len(images)
