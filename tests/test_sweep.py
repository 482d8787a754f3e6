"""Sweeps: every sweeps/*.yaml is a valid W&B sweep whose trials parse through the CLI, the
local runner builds the agent's exact argv, feeds results back (bayes) and runs end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_cli, shapes_args

from dilatedseg.sweep import SweepError, load_sweep, parse_trial, trial_argv
from dilatedseg.sweep import main as sweep_main

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import sweeps

SWEEP_FILES = sorted((REPO / "sweeps").glob("*.yaml"))


def proposals(config: dict, limit: int = 8) -> list[dict]:
    """The engine's first proposals (all of a small grid), as finished runs would leave them."""
    engine, runs = sweeps.SweepConfig(config), []
    while len(runs) < limit:
        run = sweeps.next_run(engine, runs)
        if run is None:
            break
        run.state = sweeps.RunState.finished
        run.summary_metrics = {"val/mIoU": float(len(runs))}
        runs.append(run)
    return [run.config for run in runs]


def agent_argv(config: dict, params: dict, tmp_path: Path, monkeypatch) -> list[str]:
    """The argv a real `wandb agent` starts for a run the server proposes."""
    return agent_start(config, params, tmp_path, monkeypatch)[0]


def agent_start(config: dict, params: dict, tmp_path: Path,
                monkeypatch) -> tuple[list[str], dict[str, str]]:
    """The argv and environment a real `wandb agent` starts a run the server proposes with: W&B's
    own Agent._command_run on the sweep's command as the server returns it (YAML), with its
    process start replaced by a recorder."""
    from wandb import wandb_agent

    from dilatedseg.sweep import plain

    started = []

    class Recorder:
        def __init__(self, command=None, env=None, **kwargs):
            started.append((command, env))

    monkeypatch.setattr(wandb_agent, "AgentProcess", Recorder)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # the agent sets these three in os.environ
    monkeypatch.setenv("WANDB_RUN_ID", "")
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", "")
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sweep")
    agent._sweep_command = yaml.safe_load(yaml.safe_dump(config)).get("command") or []
    server = {name: {"value": plain(spec["value"])} for name, spec in params.items()}  # JSON
    agent._command_run({"run_id": f"run{len(started)}", "program": config.get("program"),
                        "args": server})
    return started[0]


def test_the_expected_sweeps_exist():
    names = {path.stem for path in SWEEP_FILES}
    assert {"dilations", "context_variant", "lr_bayes"} <= names


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_config_is_valid_and_its_trials_parse(path, tmp_path, monkeypatch):
    """The argv a `wandb agent` builds for each proposal is the local runner's, and the CLI
    reads each swept value from it as proposed."""
    monkeypatch.chdir(REPO)
    config = load_sweep(path)
    assert sweeps.schema_violations_from_proposed_config(config) == []
    assert config["metric"] == {"name": "val/mIoU", "goal": "maximize"}
    # Inside a sweep W&B files runs under the sweep's project, not wandb.init's.
    base = yaml.safe_load((REPO / "conf/base.yaml").read_text())
    assert config["project"] == base["trainer"]["logger"]["init_args"]["project"]
    assert "${args}" in config["command"]
    trials = proposals(config, limit=3 if config["method"] == "bayes" else 8)
    assert trials
    for params in trials:
        argv = agent_argv(config, params, tmp_path, monkeypatch)
        assert argv == trial_argv(config, params)
        assert argv[:2] == ["dilatedseg", "fit"]
        parsed = parse_trial(argv)
        for name, spec in params.items():
            section, key = name.split(".")
            value = parsed[section][key]
            expected = spec["value"]
            if isinstance(expected, float):
                assert value == pytest.approx(expected)
            else:
                assert value == expected, f"{name}: {argv}"


def test_dilation_sweep_covers_the_paper_and_the_presets():
    values = load_sweep(REPO / "sweeps/dilations.yaml")["parameters"]["model.dilations"]["values"]
    assert [1, 1, 2, 4, 8, 16, 1] in values and [1, 1, 1, 1, 1, 1, 1] in values
    assert {"dilation7", "dilation10"} <= {v for v in values if isinstance(v, str)}
    argv = trial_argv(load_sweep(REPO / "sweeps/dilations.yaml"),
                      {"model.dilations": {"value": [1, 1, 2]}})
    assert "--model.dilations=[1, 1, 2]" in argv  # the agent's rendering of a list


def test_dilation_sweep_changes_only_the_schedule(monkeypatch):
    """upsample: auto would switch the Dilation10 trial to deconv upsampling."""
    monkeypatch.chdir(REPO)
    config = load_sweep("sweeps/dilations.yaml")
    parsed = parse_trial(trial_argv(config, {"model.dilations": {"value": "dilation10"}}))
    assert parsed["model"]["upsample"] == "bilinear"


def test_argv_is_what_wandb_agent_builds(tmp_path, monkeypatch):
    """Every macro and value type, against the argv of W&B's own agent (but ${interpreter}:
    the local runner's is its own Python, the agent's the `python` on PATH)."""
    import numpy as np

    monkeypatch.setenv("DATA_HOME", "/data")
    params = {"model.dilations": {"value": [np.int64(1), 1, 2, 4, 1]},
              "model.lr": {"value": np.float64(0.00123)}, "tiny": {"value": 1e-05},
              "model.context_variant": {"value": "large"}, "flag": {"value": False},
              "other": {"value": True}, "none": {"value": None}}
    macros = ["${args}", "${args_no_equals}", "${args_no_hyphens}", "${args_no_boolean_flags}",
              "${args_json}", "${args_append_hydra}", "${args_override_hydra}"]
    config = {"program": "train.py",
              "command": ["${env}", "${interpreter}", "${program}", "--root=${envvar:DATA_HOME}",
                          *macros, "--fixed"]}
    theirs = agent_argv(config, params, tmp_path, monkeypatch)
    ours = trial_argv(config, params, ["--extra=1"])
    assert theirs[:4] == ["/usr/bin/env", "python", "train.py", "--root=/data"]
    assert ours == [theirs[0], sys.executable, *theirs[2:], "--extra=1"]
    assert "--model.dilations=[1, 1, 2, 4, 1]" in ours and "--tiny=1e-05" in ours


def test_every_macro_of_the_agent_passes_the_parameters(tmp_path, monkeypatch):
    """A Hydra program's ${args_override_hydra} (++name=value) is one of the agent's macros:
    it was refused as 'command never passes the parameters' and dropped from the argv."""
    monkeypatch.setenv("DATA_HOME", "/data")
    sweep = write_sweep(tmp_path / "hydra.yaml", method="grid", program="train.py",
                        parameters={"model.lr": {"values": [0.1]}},
                        command=["${env}", "python", "${program}", "root=${envvar:DATA_HOME}",
                                 "${args_override_hydra}", "${args_append_hydra}"])
    argv = trial_argv(load_sweep(sweep), {"model.lr": {"value": 0.1}})
    assert argv == ["/usr/bin/env", "python", "train.py", "root=/data", "++model.lr=0.1",
                    "+model.lr=0.1"]


def write_sweep(path: Path, **config) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def test_bad_sweep_configs_fail_clearly(tmp_path):
    base = {"method": "grid", "metric": {"name": "val/mIoU", "goal": "maximize"},
            "command": ["dilatedseg", "fit", "${args}"]}
    nested = write_sweep(tmp_path / "nested.yaml", **base, parameters={
        "model": {"parameters": {"lr": {"values": [0.1, 0.2]}}}})
    with pytest.raises(SweepError, match="nested 'parameters'.*model.dilations"):
        load_sweep(nested)
    no_args = write_sweep(tmp_path / "noargs.yaml", **{**base, "command": ["dilatedseg", "fit"]},
                          parameters={"model.lr": {"values": [0.1]}})
    with pytest.raises(SweepError, match=r"add \$\{args\}"):
        load_sweep(no_args)
    bad_method = write_sweep(tmp_path / "method.yaml", **{**base, "method": "hyperband"},
                             parameters={"model.lr": {"values": [0.1]}})
    with pytest.raises(SweepError, match="method"):
        load_sweep(bad_method)
    with pytest.raises(SweepError, match="does not exist"):
        load_sweep(tmp_path / "missing.yaml")


def test_what_dilatedseg_cannot_read_from_the_agent_is_refused(tmp_path, monkeypatch):
    """The agent writes null as --name=None, which the CLI reads as the text 'None' (or
    refuses for a number), and ${args_no_hyphens} as name=value, which it does not read:
    the sweep config is refused with the fix, not its trials failing (or a null proposal
    reported as 'set again' by the extra arguments)."""
    from dilatedseg.sweep import parse_probes
    from sweeps import SweepConfig

    monkeypatch.chdir(REPO)
    base = {"method": "grid", "metric": {"name": "val/mIoU", "goal": "maximize"},
            "command": ["dilatedseg", "fit", "--config", "conf/shapes.yaml", "${args}"]}
    nulls = write_sweep(tmp_path / "nulls.yaml", **base, parameters={
        "model.tile_size": {"values": [None, 512]}, "model.init_from": {"value": None}})
    with pytest.raises(SweepError) as error:
        load_sweep(nulls)
    for name in ("model.tile_size", "model.init_from"):
        assert (f"parameter '{name}': the agent passes null as --{name}=None, which "
                f"dilatedseg reads as the text 'None': write the string 'null'") in str(error.value)
    # The fix named: the string 'null' reaches the CLI as null, and is no clash.
    fixed = load_sweep(write_sweep(tmp_path / "fixed.yaml", **base, parameters={
        "model.tile_size": {"values": ["null", 512]}}))
    argv = agent_argv(fixed, {"model.tile_size": {"value": "null"}}, tmp_path, monkeypatch)
    assert "--model.tile_size=null" in argv and parse_trial(argv)["model"]["tile_size"] is None
    assert parse_probes(fixed, SweepConfig(fixed), [])["model"]["tile_size"] == 512
    no_hyphens = write_sweep(tmp_path / "hyphens.yaml", **{
        **base, "command": ["dilatedseg", "fit", "${args_no_hyphens}"]},
        parameters={"model.lr": {"values": [0.1]}})
    with pytest.raises(SweepError, match=r"passes the parameters as \$\{args_no_hyphens\}, "
                                         r"which dilatedseg does not read: use \$\{args\}"):
        load_sweep(no_hyphens)
    # Another program reads its arguments its own way.
    other = {**base, "program": "x.py", "command": ["${env}", "${program}", "${args_no_hyphens}"]}
    load_sweep(write_sweep(tmp_path / "other.yaml", **other,
                           parameters={"x": {"values": [None, 1]}}))


def test_without_local_it_needs_a_wandb_login(monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")  # counts as not logged in
    with pytest.raises(SystemExit) as exit_:
        run_cli("sweep", str(REPO / "sweeps/dilations.yaml"))
    assert exit_.value.code == 2
    assert "wandb login" in capsys.readouterr().err


def test_server_sweep_goes_to_the_configs_project(tmp_path, monkeypatch):
    """As `wandb sweep`: --project, else WANDB_PROJECT, else the config's project."""
    import wandb

    import dilatedseg.loggers
    from dilatedseg.sweep import main

    calls = []
    monkeypatch.setattr(dilatedseg.loggers, "wandb_logged_in", lambda: True)
    monkeypatch.setattr(wandb, "sweep", lambda config, **kw: calls.append(kw) or "abc123")
    monkeypatch.setattr(wandb, "agent", lambda *args, **kw: None)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    sweep = write_sweep(tmp_path / "s.yaml", project="elsewhere", entity="team",
                        method="grid", parameters={"x": {"values": [1, 2]}},
                        command=["dilatedseg", "fit", "${args}"])
    main([str(sweep)])
    main([str(sweep), "--project", "mine"])
    assert calls == [{"project": "elsewhere", "entity": "team"},
                     {"project": "mine", "entity": "team"}]


def test_trials_form_a_wandb_group_and_the_sync_command_is_printed(tmp_path, monkeypatch,
                                                                  capsys):
    import dilatedseg.sweep as sweep

    envs = []

    def trial(argv, log, env):  # a trial whose W&B run logged offline
        envs.append(env)
        run = tmp_path / f"run{len(envs)}"
        (run / "wandb" / "offline-run-x").mkdir(parents=True)
        summary = {"run": str(run), "metrics": {"val/mIoU": 1.0}, "history": []}
        Path(env["DILATEDSEG_SUMMARY_PATH"]).write_text(json.dumps(summary))
        return 0

    monkeypatch.setattr(sweep, "run_logged", trial)
    config = {"method": "grid", "program": "x.py", "metric": {"name": "val/mIoU"},
              "parameters": {"x": {"values": [1, 2]}}}
    sweep.run_local(config, "toy", None, [], tmp_path / "toy-20250101")
    assert [(env["WANDB_RUN_GROUP"], env["WANDB_TAGS"]) for env in envs] == [
        ("toy-20250101", "toy")] * 2
    out = capsys.readouterr().out
    assert (f"wandb sync {tmp_path}/run1/wandb/offline-run-x "
            f"{tmp_path}/run2/wandb/offline-run-x") in out


def test_make_sweep_runs_a_whole_grid_unless_count_is_given():
    import subprocess

    def make(*options):
        done = subprocess.run(["make", "-n", "sweep", *options], cwd=REPO, capture_output=True,
                              text=True, check=True)
        return done.stdout

    assert "--count" not in make("SWEEP=context_variant")
    assert "--local --count 3 --x=1" in make("SWEEP=lr_bayes", "COUNT=3", "ARGS=--x=1")


def test_bayes_without_count_asks_for_one(monkeypatch):
    from dilatedseg.sweep import run_local

    monkeypatch.chdir(REPO)
    with pytest.raises(SweepError, match=r"--count N \(make sweep COUNT=N\)"):
        run_local(load_sweep("sweeps/lr_bayes.yaml"), "lr_bayes", None, [])


OBJECTIVE = """\
import json, os, sys
x = float(sys.argv[1].split("=", 1)[1])
if x > 0.95:
    sys.exit(3)  # a failing trial
score = 100 - 400 * (x - 0.3) ** 2
summary = {"run": "fake", "metrics": {"val/mIoU": score},
           "history": [{"val/mIoU": score - 5}, {"val/mIoU": score}]}
open(os.environ["DILATEDSEG_SUMMARY_PATH"], "w").write(json.dumps(summary))
"""


def test_local_bayes_loop_feeds_results_back(tmp_path, capsys, monkeypatch):
    engine_saw = []  # the finished trials the engine is given before each proposal
    next_run = sweeps.next_run

    def recording(config, runs, *args, **kwargs):
        engine_saw.append([(run.config["x"]["value"], str(getattr(run.state, "value", run.state)),
                            run.summary_metrics.get("val/mIoU")) for run in runs])
        return next_run(config, runs, *args, **kwargs)

    monkeypatch.setattr(sweeps, "next_run", recording)
    program = tmp_path / "objective.py"
    program.write_text(OBJECTIVE)
    sweep = write_sweep(tmp_path / "toy.yaml", method="bayes", program=str(program),
                        metric={"name": "val/mIoU", "goal": "maximize"},
                        parameters={"x": {"min": 0.0, "max": 1.0}})
    out = tmp_path / "out"
    run_cli("sweep", str(sweep), "--local", "--count", "6", "--out", str(out))
    with open(out / "trials.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 6
    finished = [r for r in rows if r["state"] == "finished"]
    scores = [float(r["val/mIoU"]) for r in finished]
    assert scores == sorted(scores, reverse=True)  # sorted by the metric, best first
    for row in finished:  # the value read back is the trial's own result
        assert float(row["val/mIoU"]) == pytest.approx(100 - 400 * (float(row["x"]) - 0.3) ** 2,
                                                       abs=1e-3)
    assert all(r["state"] == "failed" for r in rows if float(r["x"]) > 0.95)
    assert rows[-1]["state"] == "failed" or len(finished) == 6  # failures sort last
    # Each proposal after the first was made knowing every earlier trial and its result.
    assert [len(seen) for seen in engine_saw] == [0, 1, 2, 3, 4, 5, 6]
    for x, state, score in engine_saw[-1]:
        if x > 0.95:
            assert state == "failed"
        else:
            assert state == "finished" and score == pytest.approx(100 - 400 * (x - 0.3) ** 2)
    assert "| trial | state | val/mIoU | x |" in capsys.readouterr().out


def test_missing_front_end_is_trained_first(tmp_path, monkeypatch):
    """A context sweep with init_from: auto and no front-end run trains one, as make would."""
    import dilatedseg.sweep as sweep

    monkeypatch.chdir(REPO)
    calls = []
    runs = tmp_path / "runs"

    def train(argv, log, env):  # as the front-end's fit would, it saves a best checkpoint
        calls.append(argv)
        return 0 if save_checkpoint(runs / "shapes/frontend/version_0") else 1

    monkeypatch.setattr(sweep, "run_logged", train)
    # runs_dir and the data root as the trials see them (here fixed by the sweep's command,
    # not by the extra arguments), then the extra arguments, which win.
    parsed = {"runs_dir": str(runs), "data": {"class_path": "dilatedseg.data.ShapesDataModule",
                                              "init_args": {"root": "elsewhere/shapes"}},
              "model": {"stage": "context", "init_from": "auto"}}
    start = sweep.ensure_previous_stage(parsed, ["--trainer.max_epochs=1"], tmp_path)
    assert start == runs / "shapes/frontend/version_0/checkpoints/best.ckpt"
    assert calls == [["dilatedseg", "fit", "--config", "conf/shapes.yaml", "--config",
                      "conf/stage/frontend.yaml", f"--runs_dir={runs}",
                      "--data.init_args.root=elsewhere/shapes", "--trainer.max_epochs=1"]]
    parsed["model"]["init_from"] = "some.ckpt"  # named weights: nothing to train
    assert sweep.ensure_previous_stage(parsed, [], tmp_path) is None
    assert len(calls) == 1


def test_front_end_is_trained_from_any_working_directory(tmp_path, monkeypatch):
    """Where the working directory has no conf/, the front-end's configs are the package
    checkout's (as conf/base.yaml is), not a RunError saying there is no front-end."""
    import dilatedseg.sweep as sweep

    monkeypatch.chdir(tmp_path)
    calls = []

    def train(argv, log, env):
        calls.append(argv)
        save_checkpoint(tmp_path / "runs/shapes/frontend/version_0")
        return 0

    monkeypatch.setattr(sweep, "run_logged", train)
    parsed = {"runs_dir": "runs", "data": {"class_path": "dilatedseg.data.ShapesDataModule"},
              "model": {"stage": "context", "init_from": "auto"}}
    start = sweep.ensure_previous_stage(parsed, [], tmp_path)
    assert start == Path("runs/shapes/frontend/version_0/checkpoints/best.ckpt")
    assert calls == [["dilatedseg", "fit", "--config", str(REPO / "conf/shapes.yaml"),
                      "--config", str(REPO / "conf/stage/frontend.yaml"), "--runs_dir=runs"]]


def test_a_local_sweep_runs_from_any_working_directory(tmp_path, monkeypatch):
    """`dilatedseg sweep /path/to/checkout/sweeps/dilations.yaml --local` where there is no
    conf/: the trials keep the command's --config conf/... (the CLI reads them from the package
    checkout, as conf/base.yaml), the front-end it trains first is the checkout's recipe, and a
    bare sweeps/X.yaml is found there too."""
    monkeypatch.chdir(tmp_path)
    calls = fake_trials(monkeypatch, tmp_path / "runs")
    sweep_main([str(REPO / "sweeps/dilations.yaml"), "--local", "--count", "1"])
    frontend, trial = calls
    assert frontend[2:6] == ["--config", str(REPO / "conf/shapes.yaml"),
                             "--config", str(REPO / "conf/stage/frontend.yaml")]
    assert [trial[i + 1] for i, arg in enumerate(trial) if arg == "--config"] == [
        "conf/shapes.yaml", "conf/stage/context.yaml", "conf/shapes/context.yaml"]
    assert trial[-1] == "--model.init_from=runs/shapes/frontend/version_0/checkpoints/best.ckpt"
    assert load_sweep("sweeps/dilations.yaml") == load_sweep(REPO / "sweeps/dilations.yaml")


def test_extra_configs_outside_the_checkout_are_the_checkouts(tmp_path, monkeypatch):
    """`--config conf/debug.yaml` after the sweep file, outside the checkout, is read from it as
    the command's configs are: its runs_dir (runs/debug) is where the front-end is trained and
    found; it was "File does not exist: <here>/conf/debug.yaml"."""
    monkeypatch.chdir(tmp_path)
    calls = fake_trials(monkeypatch, tmp_path / "runs/debug")
    sweep_main(["sweeps/dilations.yaml", "--local", "--count", "1", "--config", "conf/debug.yaml"])
    assert len(calls) == 2  # the debug front-end, then the trial
    for argv in calls:
        assert argv[argv.index("conf/debug.yaml") - 1] == "--config"


def fake_trials(monkeypatch, runs: Path) -> list[list[str]]:
    """The argv of each run a sweep starts, in place of running it: a front-end run saves a
    checkpoint under ``runs``, a trial reports val/mIoU 1.0."""
    import dilatedseg.sweep as sweep

    calls = []

    def run(argv, log, env):
        calls.append(argv)
        if "--model.init_from=" not in " ".join(argv):  # the front-end
            save_checkpoint(runs / "shapes/frontend/version_0")
        else:
            summary = {"run": "r", "metrics": {"val/mIoU": 1.0}, "history": []}
            Path(env["DILATEDSEG_SUMMARY_PATH"]).write_text(json.dumps(summary))
        return 0

    monkeypatch.setattr(sweep, "run_logged", run)
    return calls


def test_a_server_sweep_starts_outside_the_checkout(tmp_path, monkeypatch):
    """From a directory without conf/ the sweep is created as written (the trials' CLI reads
    conf/... from the package checkout): it was refused, saying to cd into the checkout."""
    import wandb

    import dilatedseg.loggers
    from dilatedseg.sweep import main

    created = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dilatedseg.loggers, "wandb_logged_in", lambda: True)
    monkeypatch.setattr(wandb, "sweep", lambda config, **kw: created.append(config) or "abc")
    monkeypatch.setattr(wandb, "agent", lambda *args, **kw: None)
    main([str(REPO / "sweeps/dilations.yaml"), "--config", "conf/debug.yaml"])
    written = load_sweep(REPO / "sweeps/dilations.yaml")["command"]
    assert [config["command"] for config in created] == [
        [*written, "--config", "conf/debug.yaml"]]


def save_checkpoint(run_dir: Path) -> Path:
    path = run_dir / "checkpoints" / "best.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("weights")
    return path


def test_every_trial_starts_from_the_front_end_found_at_sweep_start(tmp_path, monkeypatch):
    """init_from: auto is resolved once: a front-end trained during the sweep (by it or by
    another) does not change what later trials start from; trials.csv records it."""
    import dilatedseg.sweep as sweep

    monkeypatch.chdir(REPO)
    runs = tmp_path / "runs"
    first = save_checkpoint(runs / "shapes/frontend/version_0")
    calls = []

    def trial(argv, log, env):
        calls.append(argv)
        save_checkpoint(runs / f"shapes/frontend/version_{len(calls)}")  # a newer front-end
        summary = {"run": "r", "metrics": {"val/mIoU": 50.0}, "history": []}
        Path(env["DILATEDSEG_SUMMARY_PATH"]).write_text(json.dumps(summary))
        return 0

    monkeypatch.setattr(sweep, "run_logged", trial)
    rows = sweep.run_local(load_sweep("sweeps/dilations.yaml"), "dilations", 2,
                           [f"--runs_dir={runs}"], tmp_path / "out")
    assert len(calls) == 2
    assert all(argv[-1] == f"--model.init_from={first}" for argv in calls)
    assert [row["init_from"] for row in rows] == [str(first)] * 2
    with open(tmp_path / "out" / "trials.csv") as stream:
        assert [row["init_from"] for row in csv.DictReader(stream)] == [str(first)] * 2


def test_local_grid_sweep_end_to_end(tiny_shapes, tmp_path, monkeypatch):
    """Two real context-stage trials as subprocesses (on an untrained front-end, for speed)."""
    monkeypatch.chdir(REPO)  # the sweep's command names conf/... relative to the checkout
    runs = tmp_path / "runs"
    extra = shapes_args(tiny_shapes, runs)[2:]  # without --config conf/shapes.yaml
    extra += ["--trainer.max_epochs=1", "--model.init_from=null"]
    run_cli("sweep", "sweeps/dilations.yaml", "--local", "--count", "2", *extra)

    [sweep_dir] = (runs / "sweeps").glob("dilations-*")
    with open(sweep_dir / "trials.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert [r["state"] for r in rows] == ["finished", "finished"]
    scores = [float(r["val/mIoU"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 100 for s in scores)
    assert {r["model.dilations"] for r in rows} == {"[1, 1, 2, 4, 8, 16, 1]",
                                                   "[1, 1, 1, 1, 1, 1, 1]"}
    for row in rows:  # each trial trained with its own schedule, in its own run directory
        run_dir = Path(row["run"])
        assert run_dir.parent == runs / "shapes" / "context"
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["model"]["dilations"] == json.loads(row["model.dilations"])
        summary = json.loads((run_dir / "summary.json").read_text())
        assert max(h["val/mIoU"] for h in summary["history"]) == pytest.approx(
            float(row["val/mIoU"]), abs=1e-3)


def test_local_trials_run_the_cli_of_the_runners_interpreter():
    from dilatedseg.sweep import local_command

    assert local_command(["dilatedseg", "fit", "--model.lr=0.1"]) == [
        sys.executable, "-m", "dilatedseg", "fit", "--model.lr=0.1"]
    assert local_command(["/usr/bin/env", "python", "x.py"]) == ["/usr/bin/env", "python", "x.py"]


def test_trials_start_as_runs_of_their_own(monkeypatch, tmp_path):
    """Inside a SLURM batch job or a run, a trial inherits no job id, run directory or W&B
    run (they would put every trial into one run directory)."""
    from dilatedseg.sweep import trial_env

    for name, value in (("SLURM_JOB_ID", "5"), ("SLURM_NTASKS", "4"), ("WANDB_RUN_ID", "x"),
                        ("DILATEDSEG_RUN_DIR", str(tmp_path))):
        monkeypatch.setenv(name, value)
    env = trial_env(tmp_path / "summary.json")
    assert not {"SLURM_JOB_ID", "SLURM_NTASKS", "WANDB_RUN_ID", "DILATEDSEG_RUN_DIR"} & set(env)
    assert env["DILATEDSEG_SUMMARY_PATH"] == str(tmp_path / "summary.json")


def test_extra_arguments_that_override_a_swept_parameter_are_refused(tmp_path, monkeypatch):
    """A --config after ${args} that sets model.lr would make every lr_bayes trial alike."""
    from dilatedseg.sweep import run_local

    monkeypatch.chdir(REPO)
    config = load_sweep("sweeps/lr_bayes.yaml")
    with pytest.raises(SweepError, match=r"set swept parameters again: model.lr \(proposed .*"
                                         r"would run 0.01\)"):
        run_local(config, "lr", 1, ["--config", "conf/shapes/context.yaml",
                                    f"--runs_dir={tmp_path}"], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_a_typo_in_any_value_of_a_list_stops_the_sweep_before_the_first_trial(
        tiny_shapes, tmp_path, monkeypatch):
    """Not only the first and last values are parsed up front: a typo in the middle one was
    found only when its trial came, after the trials before it had trained."""
    from dilatedseg.sweep import run_local

    monkeypatch.chdir(REPO)
    config = {"method": "grid", "metric": {"name": "val/mIoU", "goal": "maximize"},
              "parameters": {"model.lr": {"values": [0.01, "0.0x1", 0.02]}},
              "command": ["dilatedseg", "fit", "--config", "conf/shapes.yaml", "${args}"]}
    with pytest.raises(SweepError, match=r"does not parse:\n.*--model.lr=0.0x1(.|\n)*"
                                         r"Got value: 0.0x1"):
        run_local(config, "lr", None, shapes_args(tiny_shapes, tmp_path)[2:], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # before any trial


def test_parse_errors_carry_no_lightning_args_warning(monkeypatch):
    """Under `dilatedseg sweep ...` sys.argv holds the sweep's arguments: Lightning's warning
    about args= and command-line arguments together is not part of the error."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "argv", ["dilatedseg", "sweep", "sweeps/dilations.yaml"])
    with warnings.catch_warnings(record=True) as shown, pytest.raises(SweepError) as error:
        warnings.simplefilter("always")  # outside pytest, a warning prints into the error
        parse_trial(["dilatedseg", "fit", "--config", "conf/shapes.yaml", "--model.bogus=1"])
    assert "--model.bogus=1" in str(error.value)
    assert not [w for w in shown if "not recommended" in str(w.message)]


def test_a_clash_is_refused_even_when_the_first_proposal_has_the_same_value(tmp_path,
                                                                            monkeypatch):
    """context_variant's first trial proposes lr 0.01: --model.lr=0.01 would pass a check of
    that trial alone, then run 0.01 where the next trials propose 0.001."""
    import dilatedseg.sweep as sweep

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sweep, "run_logged", lambda *args: pytest.fail("nothing may run"))
    config = load_sweep("sweeps/context_variant.yaml")
    assert proposals(config, limit=1)[0]["model.lr"]["value"] == 0.01
    with pytest.raises(SweepError, match=r"set swept parameters again: model.lr \(proposed "
                                         r"0.001, would run 0.01\)"):
        sweep.run_local(config, "cv", None, ["--model.lr=0.01", f"--runs_dir={tmp_path}"],
                        tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before anything ran
    with pytest.raises(SweepError) as error:  # both probes clash: named once
        sweep.run_local(config, "cv", None, ["--model.lr=0.05", f"--runs_dir={tmp_path}"],
                        tmp_path / "out")
    assert str(error.value).count("model.lr (") == 1


def test_probes_give_every_swept_parameter_two_values():
    """Also a value the engine rarely proposes (probabilities) and a quantised range."""
    from dilatedseg.sweep import probes
    from sweeps import SweepConfig

    config = SweepConfig({"method": "random", "parameters": {
        "model.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "model.context_init": {"values": ["identity", "random"], "probabilities": [0.9, 0.1]},
        "model.dropout": {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.5},
        "seed_everything": {"value": 3}}})
    low, high, *rest = probes(config)
    assert not rest  # no list longer than two values
    for name in ("model.lr", "model.context_init", "model.dropout"):
        assert low[name]["value"] != high[name]["value"], name
    assert low["seed_everything"] == high["seed_everything"] == {"value": 3}


def test_a_misspelt_metric_stops_after_the_first_trial(tmp_path):
    """Not a table of None: one error naming the metrics the trial did log."""
    from dilatedseg.sweep import run_local

    program = tmp_path / "objective.py"
    program.write_text(OBJECTIVE)
    config = {"method": "grid", "program": str(program),
              "parameters": {"x": {"values": [0.1, 0.2]}},
              "metric": {"name": "val/miou", "goal": "maximize"}}
    with pytest.raises(SweepError, match=r"trial 1 finished without logging the sweep's metric "
                                         r"'val/miou': correct metric.name .* logged: val/mIoU"):
        run_local(config, "toy", None, [], tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").glob("*.log")] == ["trial-000.log"]


def test_a_wandb_agent_trial_started_outside_the_checkout_runs(tiny_shapes, tmp_path,
                                                                monkeypatch):
    """`wandb agent` runs the sweep's `dilatedseg fit --config conf/... ${args}` where it was
    started: there, without conf/, the trial reads those files from the package checkout and
    trains, into the agent's W&B run (offline). It failed with "File does not exist"."""
    from dilatedseg.sweep import local_command

    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    extra = [arg for arg in shapes_args(tiny_shapes, runs)[2:]  # W&B's logger, not CSV
             if not arg.startswith("--trainer.logger")]
    extra += ["--trainer.max_epochs=1", "--model.init_from=null",
              "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"]
    config = load_sweep(REPO / "sweeps/dilations.yaml")
    config["command"] += extra  # as `dilatedseg sweep` passes its extra arguments to a server
    argv, env = agent_start(config, {"model.dilations": {"value": [1, 1, 2]}}, tmp_path,
                            monkeypatch)
    assert argv[:4] == ["dilatedseg", "fit", "--config", "conf/shapes.yaml"]
    done = subprocess.run(local_command(argv), env=env, cwd=tmp_path, capture_output=True,
                          text=True)  # (the agent's `dilatedseg` as this interpreter's)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("conf/shapes.yaml", "conf/stage/context.yaml", "conf/shapes/context.yaml"):
        assert f"--config {name}: not in the working directory; reading the package " \
               f"checkout's {REPO / name}\n" in done.stderr
    [run_dir] = (runs / "shapes" / "context").iterdir()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["dilations"] == [1, 1, 2]
    assert saved["model"]["lr"] == 0.01  # conf/shapes/context.yaml's
    assert (run_dir / "wandb_id.txt").read_text() == "run0"  # the agent's run
    assert list((run_dir / "wandb").glob("offline-run-*/run-run0.wandb"))
