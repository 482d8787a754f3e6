"""`dilatedseg predict`: index / colour / overlay PNGs, and Cityscapes label ids that the
official evaluation scores exactly as our own validation did."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import run_cli, shapes_args, untrained_checkpoint
from fixtures_datasets import logged_metrics, make_cityscapes, tiny_args
from PIL import Image
from test_metrics import official_evaluation

from dilatedseg.data.cityscapes import PALETTE, label_id_lookup
from dilatedseg.viz import colourise, overlay, palette_png, voc_palette


def test_viz_helpers():
    assert voc_palette()[:3] == [(0, 0, 0), (128, 0, 0), (0, 128, 0)]
    # Pascal VOC's published colour map: tvmonitor, person, ..., and its void colour
    palette = voc_palette()
    assert len(palette) == 256 and len(voc_palette(21)) == 21
    assert [palette[i] for i in (4, 7, 8, 15, 20, 255)] == [
        (0, 0, 128), (128, 128, 128), (64, 0, 0), (192, 128, 128), (0, 64, 128), (224, 224, 192)]
    label = np.array([[0, 1], [255, 2]], np.uint8)
    colour = colourise(label, PALETTE)
    assert colour[0, 1].tolist() == list(PALETTE[1]) and colour[1, 0].tolist() == [0, 0, 0]
    image = np.full((2, 2, 3), 100, np.uint8)
    blended = overlay(image, label, PALETTE, alpha=0.5)
    assert blended[1, 0].tolist() == [100, 100, 100]  # ignored pixels stay untouched
    assert blended[0, 0].tolist() == [114, 82, 114]  # halfway to road (128, 64, 128)
    png = palette_png(label, PALETTE)  # what predict writes to index/
    assert png.mode == "P" and np.array_equal(np.asarray(png), label)
    colours = np.asarray(png.convert("RGB"))
    assert colours[0, 1].tolist() == list(PALETTE[1]) and colours[1, 1].tolist() == list(PALETTE[2])
    assert colours[1, 0].tolist() == [0, 0, 0]  # ignore


def test_predict_folder_and_split_for_the_official_server(tmp_path, monkeypatch):
    root = make_cityscapes(tmp_path / "cityscapes", {"train": 2, "val": 2})
    runs = tmp_path / "runs"
    args = tiny_args("cityscapes", root, runs, "--model.tile_size=[16,16]")
    run_cli("fit", *args)
    checkpoint = runs / "cityscapes/frontend/version_0/checkpoints/last.ckpt"
    run_cli("validate", *args, f"--ckpt_path={checkpoint}")
    validated = logged_metrics(runs / "cityscapes/frontend/validate_0")

    out = tmp_path / "server"
    run_cli("predict", *args, f"--ckpt_path={checkpoint}", f"--output={out}")
    gt = sorted((root / "gtFine/val").glob("*/*_gtFine_labelIds.png"))
    predicted = sorted((out / "labelIds").glob("*.png"))
    assert [p.name.split("_leftImg8bit")[0] for p in predicted] == [
        p.name.split("_gtFine")[0] for p in gt]
    for folder, suffix in (("index", "png"), ("colour", "png"), ("overlay", "jpg")):
        assert len(list((out / folder).glob(f"*.{suffix}"))) == 2
    # One prediction in every form: colours and label ids are those of the index PNG's classes.
    for path in sorted((out / "index").iterdir()):
        index = np.asarray(Image.open(path))
        assert index.shape == (48, 64) and index.max() < 19
        colour = np.asarray(Image.open(out / "colour" / path.name))
        assert np.array_equal(colour, colourise(index, PALETTE))
        label_ids = np.asarray(Image.open(out / "labelIds" / path.name))
        assert np.array_equal(label_ids, label_id_lookup()[index])
    official = official_evaluation(predicted, gt, monkeypatch)
    assert validated["val/mIoU"] == pytest.approx(100 * official["averageScoreClasses"], abs=1e-3)
    assert validated["val/mIoU_category"] == pytest.approx(
        100 * official["averageScoreCategories"], abs=1e-3)

    # A folder of photos: its sub-folders are kept, so equal file names do not collide.
    for folder in ("nested", "other"):
        (tmp_path / "photos" / folder).mkdir(parents=True)
        Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(
            tmp_path / "photos" / folder / "street.jpg")
    run_cli("predict", *args, f"--ckpt_path={checkpoint}",
            f"--data.init_args.predict_dir={tmp_path / 'photos'}")
    written = runs / "cityscapes/frontend/predict_1/predictions"
    assert Image.open(written / "colour/nested/street.png").size == (56, 40)
    assert (written / "overlay/other/street.jpg").is_file()
    assert sorted(p.relative_to(written / "labelIds").as_posix()
                  for p in (written / "labelIds").rglob("*.png")) == [
        "nested/street.png", "other/street.png"]


def test_predict_writes_in_the_background_and_a_failed_write_stops_it(tiny_shapes, tmp_path,
                                                                      monkeypatch):
    """The files are encoded on writer threads; every image is written, and a write that fails
    (a full disk, say) stops predict with its error instead of being lost on its thread."""
    import threading

    from dilatedseg import viz

    weights = untrained_checkpoint(tmp_path / "model.ckpt", 4, padding="same")
    args = shapes_args(tiny_shapes, tmp_path / "runs", f"--model.init_from={weights}")
    threads, colourise = set(), viz.colourise

    def recording(label, palette):
        threads.add(threading.current_thread().name)
        return colourise(label, palette)

    monkeypatch.setattr(viz, "colourise", recording)
    run_cli("predict", *args, f"--output={tmp_path / 'out'}")
    for folder in ("index", "colour", "overlay"):
        assert len(list((tmp_path / "out" / folder).iterdir())) == 8  # the 8 val images
    assert threads and all(name.startswith("predict-writer") for name in threads)

    def failing(*args):
        raise OSError("No space left on device")

    monkeypatch.setattr(viz, "overlay", failing)
    with pytest.raises(OSError, match="No space left on device"):
        run_cli("predict", *args, f"--output={tmp_path / 'full'}")


def test_a_failed_write_stops_predict_at_the_next_batch(tmp_path, monkeypatch):
    """Not only once the bounded queue of writes reaches it (up to 4 writes per thread later,
    all of them predicted for nothing)."""
    import threading
    from concurrent.futures import wait
    from types import SimpleNamespace

    import torch

    from dilatedseg import viz
    from dilatedseg.predict_writer import PredictionWriter

    first_batch_returned = threading.Event()

    def failing(*args):
        first_batch_returned.wait(timeout=30)
        raise OSError("No space left on device")

    monkeypatch.setattr(viz, "overlay", failing)
    writer = PredictionWriter(tmp_path / "out")
    writer.on_predict_start(None, None)
    trainer = SimpleNamespace(datamodule=None)
    batch = {"image": torch.zeros(1, 3, 4, 4)}
    prediction = {"name": ["a"], "prediction": torch.zeros(1, 4, 4, dtype=torch.uint8)}
    writer.write_on_batch_end(trainer, None, prediction, None, batch, 0, 0)
    first_batch_returned.set()
    wait(writer.pending)
    with pytest.raises(OSError, match="No space left on device"):
        writer.write_on_batch_end(trainer, None, prediction, None, batch, 1, 0)
    writer.writers.shutdown()
