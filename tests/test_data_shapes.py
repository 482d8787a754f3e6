"""The embedded shapes dataset: one team per image, shapes that only the distant flag tells
apart, generated from its seed and regenerated only when its settings change."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from conftest import run_cli, shapes_args
from fixtures_datasets import make_camvid_segnet
from PIL import Image

from dilatedseg.data import DataError, ShapesDataModule
from dilatedseg.data.shapes import FLAG_COLOURS, draw_sample


def test_shapes_are_grey_and_far_from_the_flag_that_names_their_team():
    for seed in range(6):
        image, label = draw_sample(np.random.default_rng(seed), 128)
        teams = set(np.unique(label).tolist()) - {0}
        assert len(teams) == 1  # the flag and every shape: one team
        (team,) = teams
        labelled = label > 0
        grey = (image[..., 0] == image[..., 1]) & (image[..., 1] == image[..., 2])
        flag = labelled & ~grey
        shapes = labelled & grey
        assert shapes.any() and 300 < flag.sum() < 700  # a disc of radius 11-14
        # The flag shows its team's colour; a shape's pixels show nothing of it.
        colour = image[flag].astype(float).mean(0)
        assert np.abs(colour - FLAG_COLOURS[team - 1]).max() < 3
        centre = np.argwhere(flag).mean(0)
        distance = np.hypot(*(np.argwhere(shapes) - centre).T)
        assert distance.min() > 64 - 18 * 0.85 * 2 ** 0.5 - 1  # centres >= 64 px apart


def test_generated_from_the_seed_and_regenerated_only_when_settings_change(tmp_path):
    def generated(root, **settings):
        module = ShapesDataModule(root=str(root), train_size=3, val_size=2, test_size=1,
                                  image_size=96, **settings)
        module.prepare_data()
        return module

    module = generated(tmp_path / "a")
    pairs = module.pairs("train")
    assert [image.name for image, _ in pairs] == ["train_00000.png", "train_00001.png",
                                                  "train_00002.png"]
    assert len(module.pairs("val")) == 2 and len(module.pairs("test")) == 1
    label = Image.open(pairs[0][1])
    assert label.mode == "P" and label.size == (96, 96) and np.asarray(label).max() <= 3
    assert json.loads((tmp_path / "a/meta.json").read_text())["seed"] == 0
    again = generated(tmp_path / "b")  # same seed elsewhere: the same files
    for (image, label), (other_image, other_label) in zip(pairs, again.pairs("train")):
        assert image.read_bytes() == other_image.read_bytes()
        assert label.read_bytes() == other_label.read_bytes()
    # The same settings again: nothing is rewritten; another seed: new images.
    first = pairs[0][0]
    first.write_bytes(b"marker")
    generated(tmp_path / "a")
    assert first.read_bytes() == b"marker"
    generated(tmp_path / "a", seed=1)
    assert first.read_bytes() != b"marker"
    assert first.read_bytes() != (tmp_path / "b/images/train/train_00000.png").read_bytes()


def test_a_root_it_cannot_be_generated_into_stops_before_the_run(tmp_path, capsys):
    """A file (was a FileExistsError traceback once training started) or another dataset's
    folder (SegNet's CamVid: its train.txt was overwritten) as the root: one message, before
    the model is built, nothing written; a generation stopped midway is redone."""
    (tmp_path / "file").write_text("x")
    camvid = make_camvid_segnet(tmp_path / "camvid")
    (camvid / "train.txt").write_text("0001TP_train0000\n")
    for root, problem in ((tmp_path / "file", f"root {tmp_path / 'file'} is a file"),
                          (camvid, f"{camvid} holds no shapes dataset (meta.json) but other "
                                   "files (test, testannot, train, ...), which generating one "
                                   "there could overwrite")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli("fit", *shapes_args(root, tmp_path / "runs", "--model.arch=tiny",
                                        "--model.pretrained=null"))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"error: shapes: {problem}: pass --data.init_args.root=<a new folder>" in err
        with pytest.raises(DataError, match=re.escape(f"{problem}: pass --root=<a new folder>")):
            from dilatedseg.prepare import main as prepare

            prepare(["shapes", "--root", str(root)])
    assert (camvid / "train.txt").read_text() == "0001TP_train0000\n"
    assert not (camvid / "images").exists() and not (tmp_path / "runs").exists()
    stopped = ShapesDataModule(root=str(tmp_path / "shapes"), train_size=2, val_size=1,
                               test_size=1, image_size=64)
    stopped.prepare_data()
    (tmp_path / "shapes" / "meta.json").unlink()  # as a generation stopped midway leaves it
    stopped.prepare_data()
    assert (tmp_path / "shapes" / "meta.json").is_file()
