"""The `dilatedseg` command: configs parse, runs land in runs/<dataset>/<stage>/<version>/,
stages chain, resuming continues, bad labels fail early with the file named."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_cli, shapes_args, untrained_checkpoint
from fixtures_datasets import logged_metrics
from PIL import Image

DATASET_CONFIGS = sorted(p.name for p in (REPO / "conf").glob("*.yaml") if p.name != "base.yaml"
                         and p.name != "debug.yaml")
STAGE_CONFIGS = sorted(p.name for p in (REPO / "conf/stage").glob("*.yaml"))


def print_config(*configs: str) -> str:
    """`dilatedseg fit --config ... [--option=value] --print_config`, in this process (it ends
    with exit 0)."""
    argv = ["fit"]
    for config in configs:
        argv += [config] if config.startswith("--") else ["--config", str(REPO / config)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        run_cli(*argv, "--print_config")
    assert exit_info.value.code in (0, None)
    return out.getvalue()


def test_every_dataset_and_stage_config_parses():
    """Each conf/<dataset>.yaml alone and with each stage overlay (and its per-dataset overlay)."""
    assert "shapes.yaml" in DATASET_CONFIGS and "context.yaml" in STAGE_CONFIGS
    for dataset in DATASET_CONFIGS:
        name = dataset.removesuffix(".yaml")
        out = print_config(f"conf/{dataset}")
        assert "stage: frontend" in out, f"conf/{dataset} alone must train the first stage"
        for stage in STAGE_CONFIGS:
            configs = [f"conf/{dataset}", f"conf/stage/{stage}"]
            if (REPO / "conf" / name / stage).is_file():
                configs.append(f"conf/{name}/{stage}")
            out = print_config(*configs)
            assert f"stage: {stage.removesuffix('.yaml')}" in out


@pytest.mark.parametrize("stage", ["frontend", "context"])
def test_benchmarks_build_the_module_the_recipe_resolves_to(stage, monkeypatch):
    """benchmarks/ read the Cityscapes recipe's model options from conf/ (no copied literals):
    each equals what `dilatedseg fit` resolves for `make train DATASET=cityscapes`."""
    import yaml

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as when run as a script
    from common import recipe_model_args

    recipe = recipe_model_args("cityscapes", stage)
    configs = ["conf/cityscapes.yaml", f"conf/stage/{stage}.yaml"]
    if (REPO / "conf/cityscapes" / f"{stage}.yaml").is_file():
        configs.append(f"conf/cityscapes/{stage}.yaml")
    resolved = yaml.safe_load(print_config(*configs))["model"]
    assert recipe["stage"] == stage and recipe["dilations"] == "dilation10"
    assert recipe.pop("pretrained") is None and "init_from" not in recipe
    assert {key: resolved[key] for key in recipe} == recipe


def test_debug_config_parses():
    out = print_config("conf/shapes.yaml", "conf/debug.yaml")
    assert "limit_train_batches: 2" in out and "CSVLogger" in out
    assert "runs_dir: runs/debug" in out  # init_from: auto of real stages never sees them


def test_debug_run_writes_what_a_run_writes(tiny_shapes, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--config",
                                    str(REPO / "conf/debug.yaml")))
    # A new run's directory holds its config.yaml before the CSV logger starts: no false alarm
    # that "previous log files in this directory will be deleted".
    assert not [w for w in caught if "will be deleted" in str(w.message)]
    run = tmp_path / "shapes" / "frontend" / "version_0"
    assert {"config.yaml", "metrics.csv", "summary.json"} <= {p.name for p in run.iterdir()}
    assert (run / "checkpoints" / "last.ckpt").is_file()
    summary = json.loads((run / "summary.json").read_text())
    # one epoch: its validation is the best, as metrics.csv logged it, and its checkpoint kept
    assert summary["best_val_mIoU"] == pytest.approx(logged_metrics(run)["val/mIoU"], abs=1e-3)
    assert [row["epoch"] for row in summary["history"]] == [0]
    assert Path(summary["best_checkpoint"]).parent == run / "checkpoints"
    assert Path(summary["best_checkpoint"]).is_file()


def test_batch_limits_keep_integers_integers():
    """Lightning reads limit 1 as one batch and 1.0 as all of them: the CLI keeps the two apart
    (jsonargparse alone turned 1 into 1.0 for these float | int options)."""
    out = print_config("conf/shapes.yaml", "--trainer.limit_train_batches=1",
                       "--trainer.limit_val_batches=0.5", "--trainer.limit_test_batches=3")
    assert "limit_train_batches: 1\n" in out and "limit_val_batches: 0.5\n" in out
    assert "limit_test_batches: 3\n" in out


def test_fast_dev_run_on_shapes(tiny_shapes, tmp_path):
    run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--trainer.fast_dev_run=2"))
    run = tmp_path / "shapes" / "frontend" / "version_0"
    assert run.is_dir()
    # A debug run saves no best checkpoint: the next stage starts from its last.ckpt.
    from dilatedseg.runs import find_previous_checkpoint

    assert find_previous_checkpoint(str(tmp_path), "shapes", "context") == (
        run / "checkpoints" / "last.ckpt")


def test_init_from_auto_without_a_previous_run_says_where_to_train_it(tmp_path):
    """`make train` alone writes under runs/: for another runs_dir (conf/debug.yaml's
    runs/debug, --runs_dir) the advice says the run must go where this one looks."""
    from dilatedseg.runs import RunError, find_previous_checkpoint

    with pytest.raises(RunError) as default:
        find_previous_checkpoint("runs", "nodata", "context")
    assert "Train it first: make train STAGE=frontend DATASET=nodata\n" in str(default.value)
    with pytest.raises(RunError) as debug:
        find_previous_checkpoint(str(tmp_path / "debug"), "shapes", "context")
    assert f"--runs_dir options that put this run under {tmp_path / 'debug'}/" in str(debug.value)


@pytest.mark.parametrize("dataset,first", [("camvid", "frontend"), ("kitti", "frontend"),
                                           ("cityscapes", "context"), ("voc", "context")])
def test_joint_without_a_previous_run_names_the_datasets_stage_before_it(dataset, first,
                                                                         tmp_path, monkeypatch):
    """CamVid and KITTI have no context stage (their joint stage starts from the front-end):
    the advice trains their front-end, not a context stage the paper's pipeline lacks."""
    from dilatedseg.runs import RunError, find_previous_checkpoint

    monkeypatch.chdir(tmp_path)  # (no runs/ of the checkout's own)
    with pytest.raises(RunError) as error:
        find_previous_checkpoint("runs", dataset, "joint")
    assert f"starts from a trained '{first}' stage" in str(error.value)
    assert f"Train it first: make train STAGE={first} DATASET={dataset}\n" in str(error.value)


@pytest.mark.parametrize("accelerator,cuda,native_bf16,expected", [
    ("auto", True, True, "bf16-mixed"),   # an Ampere / Hopper GPU
    ("gpu", True, False, "32-true"),      # a V100 / T4: bf16 only emulated, slow
    ("cpu", True, True, "32-true"),       # CPU asked for on a GPU machine
    ("auto", False, False, "32-true"),    # no GPU
])
def test_precision_defaults_to_bf16_only_on_bf16_gpus(monkeypatch, accelerator, cuda,
                                                      native_bf16, expected):
    from dilatedseg.cli import default_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",  # torch counts emulation by default
                        lambda including_emulation=True: native_bf16 or
                        (cuda and including_emulation))
    assert default_precision(accelerator) == expected


def test_unset_precision_resolves_into_the_saved_config(tiny_shapes, tmp_path):
    short = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=1",
             "--trainer.limit_val_batches=1")
    run_cli("fit", *shapes_args(tiny_shapes, tmp_path, *short))
    saved = (tmp_path / "shapes" / "frontend" / "version_0" / "config.yaml").read_text()
    assert "precision: 32-true" in saved  # no GPU here; bf16-mixed on one that has bf16
    run_cli("fit", *shapes_args(tiny_shapes, tmp_path, *short, "--trainer.precision=bf16-mixed"))
    saved = (tmp_path / "shapes" / "frontend" / "version_1" / "config.yaml").read_text()
    assert "precision: bf16-mixed" in saved  # what the user sets wins


def only_run(parent: Path) -> Path:
    runs = sorted(p for p in parent.iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def test_stage_chaining_frontend_then_context(tiny_shapes, tmp_path, capsys):
    run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--trainer.max_epochs=1"))
    frontend_run = only_run(tmp_path / "shapes" / "frontend")
    assert (frontend_run / "config.yaml").is_file()
    summary = json.loads((frontend_run / "summary.json").read_text())
    assert summary["stage"] == "frontend" and summary["best_val_mIoU"] is not None
    best = Path(summary["best_checkpoint"])
    assert best.parent == frontend_run / "checkpoints" and best.name.startswith("best")
    assert (frontend_run / "checkpoints" / "last.ckpt").is_file()
    # --ckpt_path=best: the best checkpoint of the latest run of the dataset and stage.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cli("validate", *shapes_args(tiny_shapes, tmp_path, "--ckpt_path=best"))
    # Lightning's "please add the following callbacks" / "dirpath has changed": not for an
    # evaluation, which saves no checkpoint.
    assert not [w for w in caught if "callbacks used to create the checkpoint" in str(w.message)
                or "dirpath has changed" in str(w.message)]
    validated = logged_metrics(tmp_path / "shapes" / "frontend" / "validate_0")
    assert validated["val/mIoU"] == pytest.approx(summary["best_val_mIoU"], abs=1e-3)

    # The context stage finds the frontend's best checkpoint by itself (init_from: auto).
    run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--config",
                                str(REPO / "conf/stage/context.yaml"), "--trainer.max_epochs=1"))
    context_run = only_run(tmp_path / "shapes" / "context")
    config = (context_run / "config.yaml").read_text()
    assert f"init_from: {best}" in config
    # The front-end was frozen: its weights equal the frontend stage's best checkpoint.
    before = torch.load(best, weights_only=True)["state_dict"]
    after = torch.load(context_run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    frontend_keys = [k for k in before if k.startswith("model.frontend.")]
    assert frontend_keys and all(torch.equal(before[k], after[k]) for k in frontend_keys)
    assert any(k.startswith("model.context.") for k in after)

    # The summary of the latest run of each stage, found by --runs_dir or by the fit arguments
    # (make train passes its configs and ARGS: conf/debug.yaml, say, writes under runs/debug).
    contexts = json.loads((context_run / "summary.json").read_text())["best_val_mIoU"]
    for args in (["--runs_dir", str(tmp_path)],
                 ["--", "--config", str(REPO / "conf/shapes.yaml"), f"--runs_dir={tmp_path}"]):
        capsys.readouterr()
        run_cli("summary", "--dataset", "shapes", *args)
        table = capsys.readouterr().out
        assert "Validation mIoU per stage (shapes)" in table
        assert "| frontend |" in table and "| context |" in table
        assert f"{contexts:.1f}" in table


def test_context_stage_without_frontend_says_what_to_run(tiny_shapes, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--config",
                                    str(REPO / "conf/stage/context.yaml")))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "make train STAGE=frontend DATASET=shapes" in message
    assert "--model.init_from" in message


def test_resume_from_last_checkpoint_continues_epochs(tiny_shapes, tmp_path):
    run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--trainer.max_epochs=1"))
    run = only_run(tmp_path / "shapes" / "frontend")
    last = run / "checkpoints" / "last.ckpt"
    first = torch.load(last, weights_only=True)
    assert first["global_step"] == 4  # 32 images / batch 8
    assert "--trainer.max_epochs=1" in (run / "command.txt").read_text()  # the command line
    first_start = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.csv")}
    # A resume that cannot start (a batch larger than the split) changes nothing in the run.
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit):
        run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--trainer.max_epochs=2",
                                    f"--ckpt_path={last}"), "--data.init_args.batch_size=64")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--trainer.max_epochs=2",
                                "--ckpt_path=last"))  # the latest run's last.ckpt
    # Same run directory, and training went on for exactly one more epoch (4 more steps).
    assert only_run(tmp_path / "shapes" / "frontend") == run
    assert torch.load(last, weights_only=True)["global_step"] == 8
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2
    assert [row["epoch"] for row in summary["history"]] == [0, 1]  # the first part is kept
    # The first start's config and metrics are as they were; the second start's are beside.
    assert {name: (run / name).read_bytes() for name in first_start} == first_start
    resumed = run / "resume_0"
    assert "max_epochs: 2" in (resumed / "config.yaml").read_text()
    assert {row["epoch"] for row in csv.DictReader((resumed / "metrics.csv").open())} == {"1"}


def test_model_options_a_resume_replaces_are_named(tiny_shapes, tmp_path, capsys):
    """Resuming rebuilds the checkpoint's model (Lightning's rule): a typed --model option it
    replaces was dropped without a word."""
    args = shapes_args(tiny_shapes, tmp_path, "--trainer.max_epochs=1",
                       "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1")
    run_cli("fit", *args)
    last = only_run(tmp_path / "shapes" / "frontend") / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    run_cli("fit", *args, "--trainer.max_epochs=2", f"--ckpt_path={last}", "--model.lr=0.5",
            "--model.optimizer=adam")  # adam: the checkpoint's too, so not replaced
    assert "--ckpt_path keeps the checkpoint's model, replacing --model.lr=0.5 by its 0.002: " \
           f"for other model options, start from its weights with --model.init_from={last}\n" \
        in capsys.readouterr().err
    resumed = (last.parent.parent / "resume_0" / "config.yaml").read_text()
    assert "lr: 0.002" in resumed and "lr: 0.5" not in resumed


def test_last_checkpoint_is_the_latest_epoch_even_when_the_best_is_older(tiny_shapes, tmp_path):
    """A learning rate too small to change the predictions: epoch 0 stays the best, and
    last.ckpt (what a resume starts from) still holds epoch 1."""
    run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--trainer.max_epochs=2",
                                "--model.lr=1e-30"))
    checkpoints = only_run(tmp_path / "shapes" / "frontend") / "checkpoints"
    (best,) = checkpoints.glob("best-*.ckpt")
    assert best.name.startswith("best-epoch000")
    last = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 8)
    assert sorted(p.name for p in checkpoints.iterdir()) == [best.name, "last.ckpt"]


def test_runs_without_validation_keep_one_last_checkpoint_and_resuming_a_finished_run(
        tiny_shapes, tmp_path):
    """No validation: last.ckpt every epoch, no last-v1.ckpt beside it (the best callback's
    end-of-run save). Resuming a finished run trains nothing and keeps its summary."""
    run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--trainer.max_epochs=2",
                                "--trainer.limit_val_batches=0"))
    run = only_run(tmp_path / "shapes" / "frontend")
    run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--trainer.max_epochs=3",
                                "--trainer.limit_val_batches=0", "--ckpt_path=last"))
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    before = json.loads((run / "summary.json").read_text())
    run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--trainer.max_epochs=3",
                                "--trainer.limit_val_batches=0", "--ckpt_path=last"))
    after = json.loads((run / "summary.json").read_text())
    assert after["epochs"] == before["epochs"] == 3
    assert after["metrics"] == before["metrics"] and after["metrics"]
    assert after["seconds"] >= before["seconds"] > 0


def test_checkpoint_aliases_take_the_newest_checkpoint_file(tmp_path):
    """--ckpt_path=best / last: the newest such file of the stage's runs, whatever the run
    directories' own times (a resume that fails to start touches its run's)."""
    import os

    from dilatedseg.runs import resolve_checkpoint_alias

    stage = tmp_path / "shapes" / "frontend"
    for number, (best, moment) in enumerate([("best-epoch003.ckpt", 1000),
                                             ("best-epoch001.ckpt", 2000)]):
        checkpoints = stage / f"version_{number}" / "checkpoints"
        checkpoints.mkdir(parents=True)
        for name in (best, "last.ckpt"):
            (checkpoints / name).write_bytes(b"")
            os.utime(checkpoints / name, (moment, moment))
    (stage / "validate_0").mkdir()  # an evaluation run: no checkpoints
    os.utime(stage / "version_0", (3000, 3000))  # the older run's directory touched last
    resolve = lambda which: resolve_checkpoint_alias(which, str(tmp_path), "shapes",  # noqa
                                                     "frontend")
    assert resolve("best") == str(stage / "version_1/checkpoints/best-epoch001.ckpt")
    assert resolve("last") == str(stage / "version_1/checkpoints/last.ckpt")
    assert resolve("runs/x.ckpt") == "runs/x.ckpt"  # a path stays as it is


def test_out_of_range_label_fails_naming_the_file(tiny_shapes, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_shapes, root)
    bad = root / "labels" / "val" / "val_00003.png"
    label = Image.open(bad)
    pixels = label.load()
    pixels[5, 5] = 7  # 4 classes: 7 is neither a class nor 255
    label.save(bad)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *shapes_args(root, tmp_path / "runs", "--trainer.max_epochs=1"))
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert str(bad) in message and "[7]" in message
    assert "Traceback" not in message
    # Fails before training: no checkpoint was written.
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def test_missing_label_names_path_and_prepare_command(tiny_shapes, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_shapes, root)
    missing = root / "labels" / "val" / "val_00001.png"
    missing.unlink()
    weights = untrained_checkpoint(tmp_path / "model.ckpt", 4, padding="same")
    with pytest.raises(SystemExit):
        run_cli("validate", *shapes_args(root, tmp_path / "runs", f"--model.init_from={weights}"))
    message = capsys.readouterr().err
    assert str(missing) in message and f"dilatedseg prepare shapes --root {root}" in message


def test_validate_checkpoint_with_dense_crf_keeps_the_users_choice(tiny_shapes, tmp_path):
    """The checkpoint's hyperparameters rebuild its model, but --model.crf=dense still applies
    (and the fixed CRF's constants need not be in the checkpoint)."""
    run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--trainer.max_epochs=1"))
    best = next((only_run(tmp_path / "shapes" / "frontend") / "checkpoints").glob("best*.ckpt"))
    run_cli("validate", *shapes_args(tiny_shapes, tmp_path, f"--ckpt_path={best}",
                                     "--model.crf=dense", "--model.crf_options={iterations: 1, "
                                     "test_iterations: 1}"))
    config = (tmp_path / "shapes" / "frontend" / "validate_0" / "config.yaml").read_text()
    assert "crf: dense" in config and "test_iterations: 1" in config
    assert "arch: tiny" in config  # from the checkpoint / config, unchanged


def test_evaluating_a_crf_rnn_checkpoint_without_its_crf(tiny_shapes, tmp_path):
    """--model.crf=none typed out wins over the checkpoint's rnn (an ablation of the CRF);
    left out, the checkpoint's CRF-RNN evaluates with it."""
    run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--model.stage=crf", "--model.crf=rnn",
                                "--model.init_from=null", "--trainer.max_epochs=1",
                                "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"))
    last = only_run(tmp_path / "shapes" / "crf") / "checkpoints" / "last.ckpt"
    (tmp_path / "no_crf.yaml").write_text("model:\n  crf: none\n")
    for extra, expected in (([], "crf: rnn"), (["--model.crf=none"], "crf: none"),
                            (["--config", str(tmp_path / "no_crf.yaml")], "crf: none")):
        run_cli("validate", *shapes_args(tiny_shapes, tmp_path, f"--ckpt_path={last}",
                                         "--trainer.limit_val_batches=1", *extra))
        [config] = sorted((tmp_path / "shapes" / "crf").glob("validate_*/config.yaml"),
                          key=lambda p: p.stat().st_mtime)[-1:]
        assert expected in config.read_text()


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--help")
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert all(verb in out for verb in ("prepare <dataset>", "sweep sweeps/", "summary", "fit"))


def test_misspelt_verb_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_cli("sumary", "--dataset", "shapes")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'sumary'" in err
    assert "fit, validate, test, predict, prepare, sweep, summary" in err


def test_make_train_names_the_datasets_and_stages_there_are():
    import subprocess

    for option, expected in (("DATASET=foo", "datasets: camvid cityscapes kitti shapes voc"),
                             ("STAGE=contxt", "stages: context crf frontend joint or all")):
        done = subprocess.run(["make", "-s", "train", option], cwd=REPO, capture_output=True,
                              text=True)
        assert done.returncode == 2 and expected in done.stderr, done.stderr


def test_make_runs_the_cli_of_its_python_and_refuses_init_for_all_stages():
    """`make install PYTHON=.venv/bin/python` then `make train PYTHON=...`: that install runs,
    activated or not."""
    import subprocess

    def make(*options):
        return subprocess.run(["make", "-n", *options], cwd=REPO, capture_output=True, text=True)

    python = "/opt/env/bin/python"
    for target in (["train", "STAGE=frontend"], ["train"], ["sweep"]):
        done = make(*target, f"PYTHON={python}")
        assert done.returncode == 0 and f"{python} -m dilatedseg " in done.stdout
        assert "\tdilatedseg " not in done.stdout and "\n  dilatedseg " not in done.stdout
    done = make("train", "INIT=runs/x.ckpt")
    assert done.returncode == 2 and "INIT=runs/x.ckpt is where one stage starts" in done.stderr
    # STAGE=all: each stage with the dataset's overlay where there is one, ARGS to every stage
    fits = [" ".join(line.split(" fit ")[1].split()) for line in make(
        "train", "DATASET=voc", "ARGS=--x=1").stdout.splitlines() if " fit " in line]
    assert fits == [
        "--config conf/voc.yaml --config conf/stage/frontend.yaml --x=1",
        "--config conf/voc.yaml --config conf/stage/context.yaml --config conf/voc/context.yaml "
        "--x=1",
        "--config conf/voc.yaml --config conf/stage/crf.yaml --x=1"]


def test_make_train_all_runs_each_datasets_paper_stages():
    """CamVid and KITTI train the context module jointly with the front-end (no separate context
    stage, REFERENCE §3); Cityscapes fine-tunes jointly after its context stage."""
    import subprocess

    expected = {"camvid": ["frontend", "joint"], "kitti": ["frontend", "joint"],
                "cityscapes": ["frontend", "context", "joint"],
                "voc": ["frontend", "context", "crf"], "shapes": ["frontend", "context", "crf"]}
    for dataset, stages in expected.items():
        done = subprocess.run(["make", "-n", "train", f"DATASET={dataset}"], cwd=REPO,
                              capture_output=True, text=True)
        fits = [line.split("conf/stage/")[1].split(".yaml")[0]
                for line in done.stdout.splitlines() if " fit " in line]
        assert done.returncode == 0 and fits == stages, (dataset, done.stdout)


def test_summary_written_after_each_epoch_holds_that_epochs_best(tiny_shapes, tmp_path):
    """An interrupted run's summary.json is current: read at the start of epoch 1, it holds
    epoch 0's validation and its checkpoint as the best."""
    import lightning as L

    from dilatedseg.data import ShapesDataModule
    from dilatedseg.module import SegmentationModule
    from dilatedseg.summary import RunSummary

    seen = []

    class Reader(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                seen.append(json.loads((tmp_path / "run" / "summary.json").read_text()))

    data = ShapesDataModule(root=str(tiny_shapes), train_size=32, val_size=8, test_size=8,
                            num_workers=0, batch_size=8, val_batch_size=4)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "run" / "checkpoints", monitor="val/mIoU", mode="max")
    trainer = L.Trainer(max_epochs=2, limit_train_batches=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path / "run",
                        callbacks=[RunSummary(), checkpoint, Reader()])
    trainer.fit(SegmentationModule(4, arch="tiny", padding="same"), datamodule=data)
    (summary,) = seen
    assert summary["best_val_mIoU"] == pytest.approx(summary["history"][0]["val/mIoU"], abs=1e-3)
    assert summary["best_checkpoint"].endswith(".ckpt")


def test_a_failed_command_never_takes_back_an_earlier_commands_run(tiny_shapes, tmp_path,
                                                                  capsys):
    """Commands run one after another in one process (tests, make report, sweeps): the second
    fails before making a run directory, and the first's stays."""
    weights = untrained_checkpoint(tmp_path / "model.ckpt", 4, padding="same")
    run_cli("validate", *shapes_args(tiny_shapes, tmp_path, "--trainer.limit_val_batches=0",
                                     f"--model.init_from={weights}"))
    earlier = tmp_path / "shapes" / "frontend" / "validate_0"
    assert (earlier / "config.yaml").is_file()
    with pytest.raises(SystemExit):
        run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--config",
                                    str(REPO / "conf/stage/context.yaml")))
    assert "no checkpoint was found" in capsys.readouterr().err
    assert (earlier / "config.yaml").is_file()


def test_runs_started_together_get_directories_of_their_own(tmp_path, monkeypatch):
    """Another run made version_0 after this one listed the directory: the mkdir that
    succeeds claims a version, so the two never share one."""
    from pathlib import Path

    from dilatedseg.runs import claim_next_version

    parent = tmp_path / "shapes" / "frontend"
    (parent / "version_0").mkdir(parents=True)
    monkeypatch.setattr(Path, "glob", lambda self, pattern: iter(()))  # the stale listing
    assert claim_next_version(parent, "version") == parent / "version_1"
    assert claim_next_version(parent, "version") == parent / "version_2"


def test_a_failed_start_takes_back_only_its_own_directories(tmp_path):
    """Two runs started together on a fresh tree: the one that fails removes its version_N
    and the parents it made only while they are empty, never the other run's directory."""
    from dilatedseg.runs import discard_unused_run_dirs, resolve_run_dir

    runs = tmp_path / "runs"
    mine = resolve_run_dir(str(runs), "shapes", "frontend", "fit")
    assert mine == runs / "shapes/frontend/version_0"
    other = runs / "shapes/frontend/version_1"  # the other run, started meanwhile
    other.mkdir()
    (other / "config.yaml").write_text("model: {}\n")
    assert discard_unused_run_dirs() == [mine]
    assert (other / "config.yaml").is_file() and not mine.exists()
    resolve_run_dir(str(runs), "shapes", "context", "fit")  # alone on its branch: all goes
    assert discard_unused_run_dirs() == [runs / "shapes/context/version_0",
                                         runs / "shapes/context"]


def test_resuming_a_run_that_is_still_training_is_refused(tiny_shapes, tmp_path, capsys):
    """--ckpt_path=last while the run it names still trains (another terminal holds its lock):
    stopped before anything runs, not a second training writing into the same directory."""
    import fcntl

    from dilatedseg.runs import LOCK_FILE

    run = tmp_path / "shapes" / "frontend" / "version_0"
    untrained_checkpoint(run / "checkpoints" / "last.ckpt", 4, padding="same")
    with open(run / LOCK_FILE, "a") as other:  # the training process's lock
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit) as exit_info:
            run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--ckpt_path=last"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"the run {run} is still training in another process" in err
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, "checkpoints"]  # no resume_0


@pytest.mark.parametrize("stop,code,message", [
    ("ctrl-c", 130, "error: interrupted (Ctrl-C); resume it with --ckpt_path="),
    ("damaged file", 2, "(the run stopped after it had started; once that is fixed, resume it "
                        "with --ckpt_path="),
])
def test_a_run_stopped_midway_names_the_checkpoint_to_resume_from(tiny_shapes, tmp_path,
                                                                   monkeypatch, capsys, stop,
                                                                   code, message):
    """Ctrl-C (Lightning exits 1, saying only 'attempting graceful shutdown') and a damaged
    file found in the second epoch: like SIGTERM, the message says how to go on."""
    from dilatedseg.data import DataError
    from dilatedseg.module import SegmentationModule

    training_step = SegmentationModule.training_step

    def stopping(self, batch, batch_idx):
        if self.current_epoch == 1:
            if stop == "ctrl-c":
                raise KeyboardInterrupt
            raise DataError("cannot read image x.png: truncated. Re-download or remove it.")
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(SegmentationModule, "training_step", stopping)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *shapes_args(tiny_shapes, tmp_path, "--trainer.max_epochs=2"))
    assert exit_info.value.code == code
    last = only_run(tmp_path / "shapes" / "frontend") / "checkpoints" / "last.ckpt"
    assert f"{message}{last}" in capsys.readouterr().err
    assert torch.load(last, weights_only=True)["epoch"] == 0  # kept: the first epoch's


def test_init_from_auto_does_not_start_from_a_run_that_is_still_training(tmp_path):
    """The front-end's best checkpoint so far, of a run still training, is not a finished
    front-end: the context stage stops and says so, rather than start from it silently."""
    import fcntl

    from dilatedseg.runs import LOCK_FILE, RunError, find_previous_checkpoint

    run = tmp_path / "shapes" / "frontend" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best-epoch000-miou40.00.ckpt").write_bytes(b"weights")
    with open(run / LOCK_FILE, "a") as training:
        fcntl.flock(training, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunError, match=r"its 'frontend' run is still training: wait"):
            find_previous_checkpoint(str(tmp_path), "shapes", "context")
    assert find_previous_checkpoint(str(tmp_path), "shapes", "context").parent.parent == run


@pytest.mark.parametrize("devices,num_nodes", [(1, 1), (2, 1), ("3", 1), (2, 2), ("auto", 2)])
def test_known_world_size_on_the_cpu_is_lightnings(devices, num_nodes):
    """The process count the data is checked for before the trainer exists is the one the
    trainer then has."""
    import lightning as L

    from dilatedseg.cli import known_world_size

    config = {"accelerator": "cpu", "devices": devices, "num_nodes": num_nodes}
    trainer = L.Trainer(**config, strategy="ddp", logger=False, enable_checkpointing=False)
    assert known_world_size(config) == trainer.world_size


@pytest.mark.parametrize("devices,num_nodes,expected", [
    ([0, 1], 1, 2), ("0,1", 2, 4), ("1,", 1, 1),  # GPU ids: one process each
    ("auto", 1, None), (-1, 1, None), ("-1", 1, None),  # as many as the machine has
])
def test_known_world_size_of_gpus_is_none_where_the_machine_decides(devices, num_nodes,
                                                                   expected):
    from dilatedseg.cli import known_world_size

    config = {"accelerator": "gpu", "devices": devices, "num_nodes": num_nodes}
    assert known_world_size(config) == expected
    assert known_world_size({**config, "accelerator": "auto"}) == expected


def test_typed_model_options_name_each_model_key_typed(tmp_path):
    """The keys whose values a resume replaces: every --model.<key> option, a nested one by
    its top key; a --config file's model options are not typed ones."""
    from dilatedseg.cli import typed_model_options

    (tmp_path / "model.yaml").write_text("model:\n  lr: 0.1\n")
    argv = ["fit", "--config", str(tmp_path / "model.yaml"), "--model.lr=0.5",
            "--model.crf_options.theta_alpha=80", "--model.optimizer", "adam",
            "--trainer.max_epochs=1", "--model.crf=none"]
    assert typed_model_options(argv) == ["lr", "crf_options", "optimizer", "crf"]


def test_typed_options_are_evaluation_options_typed_whole_or_in_a_config(tmp_path):
    """The evaluation options the user set (none / null included): --model.<key>[=value] for
    the whole option, or the model section of a --config / --config= / -c file or inline YAML;
    a nested option (--model.crf_options.x) does not set the whole of crf_options."""
    from dilatedseg.cli import typed_options

    (tmp_path / "tiles.yaml").write_text("model:\n  tile_size: null\n  lr: 0.1\n")
    (tmp_path / "deploy.yaml").write_text("model:\n  tile_whole_network: true\n")
    assert typed_options(["validate", "--model.crf=none", "--model.crf_options.iterations=2",
                          "--model.lr=0.1"]) == {"crf"}
    assert typed_options(["validate", "--model.crf_options", "{iterations: 2}"]) == {
        "crf_options"}
    assert typed_options(["validate", "--config", str(tmp_path / "tiles.yaml"),
                          f"--config={tmp_path / 'deploy.yaml'}"]) == {
        "tile_size", "tile_whole_network"}
    assert typed_options(["validate", "-c", str(tmp_path / "tiles.yaml")]) == {"tile_size"}
    assert typed_options(["validate", "--config", str(tmp_path / "missing.yaml")]) == set()
    # YAML given inline (was left out: only files were read); one that does not parse is the
    # parser's to name.
    assert typed_options(["validate", "--config", "{model: {crf: none}}",
                          "--config", "{model: [}"]) == {"crf"}


def entry_points() -> list[list[str]]:
    """The ways to start the command: `python -m dilatedseg`, `python -m dilatedseg.cli` (the
    Makefile's) and the installed console script (when `make install` put one on the PATH)."""
    script = shutil.which("dilatedseg")
    return [[sys.executable, "-m", "dilatedseg"], [sys.executable, "-m", "dilatedseg.cli"],
            *([[script]] if script else [])]


@pytest.mark.parametrize("entry", entry_points(), ids=lambda e: " ".join(e[1:]) or "script")
def test_help_and_errors_name_the_program_dilatedseg(entry, tmp_path):
    """`--X.help CLASS` printed `usage: cli.py ...` (and its errors `cli.py --help`) under
    python -m: argparse's default program name is the started file's."""
    def run(*args: str) -> str:
        done = subprocess.run([*entry, *args], capture_output=True, text=True, cwd=tmp_path)
        return done.stdout + done.stderr

    usage = run("fit", "--trainer.logger.help", "CSVLogger")
    assert usage.startswith("usage: dilatedseg --trainer.logger.save_dir"), usage[:300]
    error = run("fit", "--data.help", "ShapesDataModule", "--data.nope=1")
    assert "error: unrecognized arguments: --data.nope=1\n(the options: dilatedseg " in error
    assert "cli.py" not in usage + error and "__main__.py" not in usage + error


def fit_config(*args: str) -> tuple[dict, str]:
    """The resolved config of `dilatedseg fit ARGS --print_config`, and its stderr."""
    import yaml

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            pytest.raises(SystemExit) as exit_info:
        run_cli("fit", *args, "--print_config")
    assert exit_info.value.code in (0, None), err.getvalue()
    return yaml.safe_load(out.getvalue()), err.getvalue()


def test_relative_configs_the_working_directory_lacks_are_the_checkouts(tmp_path, monkeypatch):
    """A `wandb agent` started outside the checkout runs `dilatedseg fit --config
    conf/shapes.yaml ...` there: each relative --config file (--config, --config=, -c) that the
    working directory lacks is read from the package checkout, and stderr names it."""
    monkeypatch.chdir(tmp_path)
    config, err = fit_config("--config", "conf/shapes.yaml", "--config=conf/stage/context.yaml",
                             "-c", "conf/shapes/context.yaml")
    assert config["model"]["stage"] == "context" and config["model"]["lr"] == 0.01
    assert config["data"]["class_path"] == "dilatedseg.data.ShapesDataModule"
    for name in ("conf/shapes.yaml", "conf/stage/context.yaml", "conf/shapes/context.yaml"):
        assert (f"--config {name}: not in the working directory; reading the package "
                f"checkout's {REPO / name}\n") in err
    # The working directory's own file wins, without a word.
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf/shapes.yaml").write_text(
        (REPO / "conf/shapes.yaml").read_text() + "runs_dir: mine\n")
    config, err = fit_config("--config", "conf/shapes.yaml")
    assert config["runs_dir"] == "mine" and "conf/shapes.yaml" not in err
    # A config given as YAML text stays that, also a long one (it stopped with OSError: File
    # name too long, asked first whether it is a file).
    config, err = fit_config("--config", "conf/shapes.yaml", "--config", "{runs_dir: inline}")
    assert config["runs_dir"] == "inline" and err == ""
    long = "x" * 300  # (one path component over the 255 characters a name may have)
    config, err = fit_config("--config", "conf/shapes.yaml", "--config", f"{{runs_dir: {long}}}")
    assert config["runs_dir"] == long and err == ""


def missing_config_error(capsys) -> str:
    """What `dilatedseg fit --config conf/shapess.yaml` (a file nowhere) says; it exits 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli("fit", "--config", "conf/shapess.yaml")
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_a_config_in_neither_place_is_one_error_naming_both(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert missing_config_error(capsys) == (
        f"error: File does not exist: --config conf/shapess.yaml is not in the working "
        f"directory ({tmp_path}) nor in the package checkout ({REPO})\n"
        "(the options: dilatedseg fit --help)\n")
    monkeypatch.chdir(REPO)  # one place
    assert missing_config_error(capsys).startswith(
        f"error: File does not exist: --config conf/shapess.yaml is not in the working "
        f"directory ({REPO})\n")


def test_a_missing_config_under_an_install_without_conf_names_no_checkout(tmp_path,
                                                                          monkeypatch, capsys):
    """pip install . puts dilatedseg/ in site-packages, which has no conf/: the error named
    site-packages as "the package checkout", where no config could ever be."""
    import dilatedseg.cli

    site_packages = tmp_path / "site-packages"
    (site_packages / "dilatedseg").mkdir(parents=True)
    monkeypatch.setattr(dilatedseg.cli, "PACKAGE_ROOT", site_packages)
    monkeypatch.setattr(dilatedseg.cli, "PACKAGE_CONF", site_packages / "conf")
    monkeypatch.chdir(tmp_path)
    assert missing_config_error(capsys) == (
        f"error: File does not exist: --config conf/shapess.yaml is not in the working "
        f"directory ({tmp_path}); dilatedseg is installed without its checkout "
        f"({site_packages} has no conf/): run in the checkout, pass the file's path, or "
        "install the checkout with pip install -e\n(the options: dilatedseg fit --help)\n")


def test_read_ints_as_ints_still_finds_jsonargparses_types():
    """read_ints_as_ints edits jsonargparse's private ActionTypeHint._typehint (there is no
    public way to change an added argument's type): renamed, it would silently do nothing and
    --trainer.limit_val_batches=1 would validate on every batch."""
    import typing

    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    from dilatedseg.cli_parser import read_ints_as_ints

    parser = LightningArgumentParser()
    parser.add_class_arguments(Trainer, "trainer", fail_untyped=False, instantiate=False)
    read_ints_as_ints(parser)
    hints = {action.dest: getattr(action, "_typehint", None) for action in parser._actions}
    for split in ("train", "val", "test", "predict"):
        hint = hints.get(f"trainer.limit_{split}_batches")
        assert hint is not None, "jsonargparse's actions no longer carry _typehint: " \
                                 "read_ints_as_ints needs another way to read 1 as an int"
        assert typing.get_args(hint)[0] is int, hint
