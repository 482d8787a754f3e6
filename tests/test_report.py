"""`python -m dilatedseg.report`: receptive-field computation, the pipeline on a tiny budget,
and the missing-data error of a real dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dilatedseg import report
from dilatedseg.models.context import ContextModule, receptive_field


@pytest.mark.parametrize("dilations", [(1,), (1, 1, 2, 4, 8, 1), (1, 1, 2, 4, 8, 16, 1), (3, 2)])
@pytest.mark.parametrize("init", ["identity", "random"])
def test_context_gradient_extent_is_the_receptive_field(dilations, init):
    torch.manual_seed(0)
    context = ContextModule(4, dilations=dilations, init=init)
    gradient = report.context_gradient(context)
    field = receptive_field(dilations)
    rows = np.flatnonzero(gradient.any(axis=1))
    cols = np.flatnonzero(gradient.any(axis=0))
    assert (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == (field, field)
    # Centred on the output cell, and nothing reaches past the field.
    assert rows[0] + rows[-1] == gradient.shape[0] - 1


def test_predictions_are_tiled_as_the_module_evaluates():
    from dilatedseg.inference import predict_logits
    from dilatedseg.module import SegmentationModule

    torch.manual_seed(0)
    module = SegmentationModule(4, stage="context", arch="tiny", padding="same",
                                context_init="random", tile_size=16,
                                tile_whole_network=True).eval()
    images = torch.rand(1, 3, 48, 48) * 255
    with torch.no_grad():
        whole_network = predict_logits(module.model, images, 16, True).argmax(1)
        frontend_only = predict_logits(module.model, images, 16, False).argmax(1)
    assert not torch.equal(whole_network, frontend_only)  # the option matters here
    assert np.array_equal(report.predict(module, images), whole_network.numpy())


def test_machine_closes_cpuinfo():
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert "cores" in report.machine()
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_val_examples_of_different_sizes_batch():
    class Data:  # a data module whose val images differ in size, as VOC's
        def setup(self, stage):
            self.datasets = {"val": [
                {"image": torch.full((3, h, w), i, dtype=torch.uint8),
                 "label": torch.full((h, w), i, dtype=torch.uint8)}
                for i, (h, w) in enumerate([(40, 56), (48, 32), (36, 64)])]}

    images, labels = report.val_examples(Data(), 8)
    assert images.shape == (3, 3, 36, 32) and [label.shape for label in labels] == [(36, 32)] * 3
    assert [int(image[0, 0, 0]) for image in images] == [int(label[0, 0]) for label in labels]


def test_schedule_label_reads_sweep_values():
    assert report.schedule_label("[1, 1, 2]") == ("1,1,2", (1, 1, 2))
    label, dilations = report.schedule_label("dilation7")
    assert dilations == (1, 1, 2, 4, 8, 1) and label.startswith("dilation7")


def test_report_quick_pipeline(tmp_path):
    out = tmp_path / "report"
    report.main([
        "--dataset", "shapes", "--out", str(out), "--runs_dir", str(tmp_path / "runs"),
        "--quick",  # 64x64 images: the CRF stages dominate and scale with pixels
        f"--data.init_args.root={tmp_path / 'shapes'}", "--data.init_args.image_size=64",
        "--data.init_args.train_size=32", "--data.init_args.val_size=8",
        "--data.init_args.test_size=8",
        "--data.init_args.num_workers=0", "--data.init_args.batch_size=2",  # few CRF images
        "--data.init_args.val_batch_size=2",
    ])
    text = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    number = r"(\d+\.\d)"
    for key, row in (("frontend", "Front end"), ("basic", r"\+ Basic context"),
                     ("large", r"\+ Large context")):
        match = re.search(rf"\| {row} \| {number} \| {number} \| {number} \|", text)
        assert match, f"no numeric Table 3 row '{row}' in report.md:\n{text}"
        scores = results["table"][key]
        assert list(match.groups()) == [f"{scores[c]:.1f}" for c in ("none", "dense", "rnn")]
        # The no-CRF and CRF-RNN columns are the best validations of the runs named.
        for column, run in (("none", "frontend" if key == "frontend" else f"context-{key}-"
                                                                            "identity"),
                            ("rnn", f"crf-rnn-{key}")):
            summary = json.loads((Path(results["runs"][run]) / "summary.json").read_text())
            assert scores[column] == summary["best_val_mIoU"], (key, column)
    assert len(results["sweep"]) == 2 and all(p["miou"] is not None for p in results["sweep"])
    assert [p["field_cells"] for p in results["sweep"]] == [3, 7]  # the grid's first schedules
    assert set(results["init"]) == {"basic-identity", "basic-random", "large-identity",
                                    "large-random"}
    for name in ("predictions", "receptive_fields", "init_curves", "dilation_sweep"):
        path = out / f"{name}.png"
        assert f"({name}.png)" in text
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_report_on_missing_dataset_fails_early_with_its_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        report.main(["--dataset", "camvid", "--out", str(tmp_path / "report"),
                     "--runs_dir", str(tmp_path / "runs"),
                     f"--data.init_args.root={tmp_path / 'no-camvid'}"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "camvid" in error and "no-camvid" in error and "Prepare it with" in error
    assert "Traceback" not in error
    assert not (tmp_path / "runs" / "camvid").exists()  # nothing trained


def test_report_unknown_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit):
        report.main(["--dataset", "nope", "--out", str(tmp_path / "r"),
                     "--runs_dir", str(tmp_path / "runs")])
    assert "conf/nope.yaml" in capsys.readouterr().err
