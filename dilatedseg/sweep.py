"""`dilatedseg sweep`: run a W&B sweep config (sweeps/*.yaml), with or without a W&B server.

    dilatedseg sweep sweeps/dilations.yaml --local --count 4 [EXTRA CLI ARGS...]
    dilatedseg sweep sweeps/dilations.yaml [--count N]      # W&B server: wandb.sweep + agent

``--local`` needs no account and no network: W&B's open-source sweep engine (the ``sweeps``
package: grid / random / bayes) proposes each trial, and the trial runs as a subprocess with
exactly the argv a ``wandb agent`` would build from the config's ``command`` (``${args}`` ->
``--name=value`` per parameter, ``${env}``, ``${interpreter}``, ``${program}``,
``${envvar:NAME}``, by W&B's own code), followed by any EXTRA arguments (they override the
sweep's values, e.g. to shrink trials); the CLI reads a relative ``--config`` file that the
working directory lacks from the package checkout, so a sweep runs from anywhere (see
:func:`dilatedseg.cli.checkout_configs`). Trials log to W&B offline; each trial's metrics
come back from its run summary (see :class:`dilatedseg.summary.RunSummary`) and feed the next
proposal. The result is a table of trials sorted by the sweep's metric, also written as
trials.csv under ``<runs_dir>/sweeps/<name>-<time>/`` beside each trial's log.

A context-stage sweep starts from a trained front-end (``init_from: auto``): the local runner
resolves it once, before the first trial (training one first when none exists, as ``make train
STAGE=frontend`` would), and passes it to every trial as ``--model.init_from``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import shlex
import subprocess
import sys
import time
import warnings
from pathlib import Path

import yaml

from dilatedseg.runs import (
    PREVIOUS_STAGES,
    RUN_DIR_ENV,
    RunError,
    find_previous_checkpoint,
)
from dilatedseg.summary import SUMMARY_PATH_ENV

# The macros `wandb agent` fills with a run's parameters (wandb/wandb_agent.py, _command_run).
ARG_MACROS = ("args", "args_no_equals", "args_no_hyphens", "args_no_boolean_flags",
              "args_json", "args_json_file", "args_append_hydra", "args_override_hydra")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # as wandb agent's


class SweepError(RunError):
    """A sweep cannot run as configured; the message says what to do."""


# ---- the sweep config -----------------------------------------------------------------------
def load_sweep(path: str | Path) -> dict:
    """Read and check a W&B sweep config; SweepError names every problem."""
    from dilatedseg.cli import PACKAGE_ROOT, project_file

    path = Path(path)
    if not path.is_file() and not path.is_absolute():
        path = project_file(str(path)) or path  # sweeps/X.yaml: also the package checkout's
    if not path.is_file():
        folder = Path("sweeps") if Path("sweeps").is_dir() else PACKAGE_ROOT / "sweeps"
        found = ", ".join(sorted(p.name for p in folder.glob("*.yaml"))) or "none"
        raise SweepError(f"sweep config {path} does not exist ({folder} holds: {found})")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SweepError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(config, dict):
        raise SweepError(f"{path} must be a YAML mapping (method, metric, parameters, command)")
    problems = schema_problems(config)
    if problems:
        raise SweepError(f"{path} is not a valid W&B sweep config:\n  " + "\n  ".join(problems))
    return config


def schema_problems(config: dict) -> list[str]:
    """The sweep engine's JSON-schema violations plus what the local runner cannot do."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sweeps import schema_violations_from_proposed_config
    try:
        problems = list(schema_violations_from_proposed_config(config))
    except ValueError as error:
        problems = [str(error)]
    if config.get("method") not in ("grid", "random", "bayes"):
        problems.append(f"method must be grid, random or bayes, got {config.get('method')!r}")
    for name, spec in (config.get("parameters") or {}).items():
        if isinstance(spec, dict) and "parameters" in spec:
            # The engine's validation silently drops nested blocks; ${args} could not pass them.
            problems.append(f"parameter '{name}' holds a nested 'parameters' block: name each "
                            f"leaf with dots instead (e.g. 'model.dilations')")
    command = config.get("command") or DEFAULT_COMMAND
    if not any(f"${{{macro}}}" in str(part) for part in command for macro in ARG_MACROS):
        problems.append("command never passes the parameters: add ${args}, e.g. command: "
                        "[dilatedseg, fit, --config, conf/shapes.yaml, ${args}]")
    if "${program}" in command and not config.get("program"):
        problems.append("command uses ${program} but the config sets no program")
    if config.get("method") == "bayes" and not config.get("metric"):
        problems.append("a bayes sweep needs a metric (e.g. metric: {name: val/mIoU, "
                        "goal: maximize})")
    if dilatedseg_verb([str(part) for part in command]) is not None:
        problems += unreadable_by_dilatedseg(config.get("parameters") or {}, command)
    return problems


def unreadable_by_dilatedseg(parameters: dict, command: list) -> list[str]:
    """What `wandb agent` would pass a dilatedseg command that the CLI cannot read as meant:
    parameters in another form than --name=value, and null (which the agent writes as None)."""
    problems = [f"command passes the parameters as ${{{macro}}}, which dilatedseg does not "
                "read: use ${args} (--name=value)" for macro in ARG_MACROS
                if macro not in ("args", "args_no_equals") and f"${{{macro}}}" in command]
    for name, spec in parameters.items():
        spec = spec if isinstance(spec, dict) else {}
        if None in (spec.get("values") or []) or ("value" in spec and spec["value"] is None):
            problems.append(f"parameter '{name}': the agent passes null as --{name}=None, which "
                            "dilatedseg reads as the text 'None': write the string 'null' "
                            "(e.g. values: ['null', 512])")
    return problems


def plain(value):
    """numpy scalars (the engine's proposals) -> Python values, as a W&B server returns them."""
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value.item() if hasattr(value, "item") else value


def agent_args(params: dict) -> dict[str, list[str]]:
    """The argument macros `wandb agent` fills from a run's parameters, by W&B's own code."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    values = {name: {"value": plain(spec["value"])} for name, spec in params.items()}
    return create_sweep_command_args({"args": values})


def trial_argv(config: dict, params: dict, extra: list[str] = (),
               args_json_file: Path | None = None) -> list[str]:
    """The argv `wandb agent` would run for these parameters, then the extra arguments (the
    interpreter is this one, where the agent's is ``python``)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command

    macros = agent_args(params)
    macros.update(env=["/usr/bin/env"], interpreter=[sys.executable],
                  program=[str(config.get("program", ""))])
    if args_json_file is not None:
        macros["args_json_file"] = [str(args_json_file)]
    argv = []
    # ${envvar:NAME} -> $NAME, as the agent does (on a copy: W&B's function edits its list).
    for part in create_sweep_command([str(p) for p in config.get("command") or DEFAULT_COMMAND]):
        if part.startswith("${") and part.endswith("}"):
            argv += macros.get(part[2:-1]) or []
        else:
            argv.append(part)
    return argv + list(extra)


# ---- parsing a trial's argv with the CLI (no training) ----------------------------------------
def dilatedseg_verb(argv: list[str]) -> int | None:
    """Index of the subcommand if argv runs `dilatedseg`, else None."""
    for start in range(len(argv)):
        word = argv[start]
        if Path(word).name == "dilatedseg":
            return start + 1
        if word == "-m" and start + 1 < len(argv) and argv[start + 1].startswith("dilatedseg"):
            return start + 2
    return None


def parse_trial(argv: list[str]) -> dict | None:
    """The resolved config of a `dilatedseg fit|validate|...` argv (via --print_config)."""
    verb = dilatedseg_verb(argv)
    if verb is None or verb >= len(argv):
        return None
    from dilatedseg.cli import DilatedSegCLI

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings():
            # Lightning warns when args= is given while sys.argv holds the sweep's own arguments.
            warnings.filterwarnings("ignore", message=".*not recommended to provide both args")
            DilatedSegCLI(args=argv[verb:] + ["--print_config"])
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise SweepError(f"the trial command does not parse:\n  {shlex.join(argv)}\n"
                             f"{err.getvalue().strip()}") from None
    return yaml.safe_load(out.getvalue())


def overridden(parsed: dict, params: dict) -> dict[str, str]:
    """Swept parameters whose proposed value is not what the trial would run (name -> what it
    would run): something after ``${args}`` (an extra --config or option) sets them again, so
    every trial would be alike."""
    names = {}
    for name, spec in params.items():
        value, node, found = as_read(plain(spec["value"])), parsed, True
        for key in name.split("."):
            if not isinstance(node, dict) or key not in node:
                found = False
                break
            node = node[key]
        if not found:
            continue
        if isinstance(value, float) and isinstance(node, int | float):
            same = abs(node - value) <= 1e-9 * max(abs(value), 1e-30)
        else:
            same = node == value
        if not same:
            names[name] = f"{name} (proposed {value!r}, would run {node!r})"
    return names


def as_read(value):
    """A swept value as the CLI reads it from ``--name=value``: a string as YAML ('null' is
    None), unless it is no YAML."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def probes(engine_config) -> list[dict]:
    """Sets of parameters, parsed before the first trial, in which every value a list offers
    appears (a typo in any of them stops the sweep before it trains anything, not when its
    trial comes) and every swept parameter takes two different values in the first two (a
    range its 1st and 99th percentiles), so that :func:`overridden` finds an argument that sets
    it again, whatever it sets."""
    from sweeps.params import HyperParameterSet

    params = HyperParameterSet.from_config(engine_config["parameters"])
    choices = {param.name: param.config.get("values") or [param.ppf(0.01), param.ppf(0.99)]
               for param in params}
    count = max([2, *map(len, choices.values())])
    return [{name: {"value": plain(values[k % len(values)])} for name, values in choices.items()}
            for k in range(count)]


# ---- the local runner -------------------------------------------------------------------------
def ensure_previous_stage(parsed: dict, extra: list[str], out_dir: Path) -> Path | None:
    """The checkpoint that `init_from: auto` names for the trials (None when they set
    init_from themselves), after training the front-end when none exists yet."""
    from dilatedseg.cli import import_class, project_file, stage_configs

    model = parsed.get("model") or {}
    if model.get("init_from") != "auto":
        return None
    dataset = import_class(parsed["data"]["class_path"]).name
    runs_dir, stage = parsed.get("runs_dir", "runs"), model.get("stage")
    try:
        return find_previous_checkpoint(runs_dir, dataset, stage)
    except RunError as error:
        # The working directory's conf/, else the package checkout's (as for conf/base.yaml).
        recipe = project_file(f"conf/{dataset}.yaml")
        if "frontend" not in PREVIOUS_STAGES.get(stage, ()) or recipe is None:
            raise SweepError(str(error)) from None
    argv = ["dilatedseg", "fit", *stage_configs(recipe.parent, dataset, "frontend")]
    # Where the trials look for it, and their data, even when the sweep's command fixes them.
    argv.append(f"--runs_dir={runs_dir}")
    root = ((parsed.get("data") or {}).get("init_args") or {}).get("root")
    if root:
        argv.append(f"--data.init_args.root={root}")
    argv += extra
    log = out_dir / "frontend.log"
    print(f"no trained front-end under {runs_dir}/{dataset}/frontend/: training one first "
          f"(as `make train STAGE=frontend DATASET={dataset}`), log: {log}\n  "
          f"{shlex.join(argv)}", flush=True)
    code = run_logged(argv, log, trial_env(None))
    if code != 0:
        raise SweepError(f"training the front-end failed (exit {code}); see {log}:\n"
                         f"{tail(log)}")
    try:
        return find_previous_checkpoint(runs_dir, dataset, stage)
    except RunError as error:
        raise SweepError(f"the front-end trained but saved no checkpoint: {error}") from None


def trial_env(summary_path: Path | None, sweep_dir: Path | None = None,
              name: str | None = None) -> dict[str, str]:
    """A trial's environment: its own run, reporting to summary_path; a sweep's trials form
    one W&B group (the sweep directory's name), tagged with the sweep's name."""
    env = dict(os.environ)
    env.setdefault("WANDB_MODE", "offline")  # no server: `wandb sync` the runs later
    # Each trial is a run of its own: no inherited run directory, W&B run or SLURM job id
    # (which would name one run directory for every trial of a sweep inside a batch job).
    for variable in (RUN_DIR_ENV, "WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_SWEEP_PARAM_PATH",
                     "SLURM_JOB_ID", "SLURM_NTASKS"):
        env.pop(variable, None)
    if summary_path is not None:
        env[SUMMARY_PATH_ENV] = str(summary_path)
    if sweep_dir is not None:  # read by configure_logger (group) and by wandb itself (tags)
        env["WANDB_RUN_GROUP"], env["WANDB_TAGS"] = sweep_dir.name, name or sweep_dir.name
    return env


def local_command(argv: list[str]) -> list[str]:
    """A trial's command as the local runner runs it: a bare ``dilatedseg`` becomes this
    interpreter's ``python -m dilatedseg`` (the install running the sweep, whether its
    environment is activated or not); the arguments are the agent's."""
    if argv and argv[0] == "dilatedseg":
        return [sys.executable, "-m", "dilatedseg", *argv[1:]]
    return argv


def run_logged(argv: list[str], log: Path, env: dict[str, str]) -> int:
    argv = local_command(argv)
    with open(log, "w") as stream:
        stream.write(shlex.join(argv) + "\n\n")
        stream.flush()
        try:
            return subprocess.run(argv, stdout=stream, stderr=subprocess.STDOUT, env=env).returncode
        except FileNotFoundError as error:
            stream.write(f"{error}\n")
            return 127


def tail(path: Path, lines: int = 15) -> str:
    text = path.read_text(errors="replace").rstrip().splitlines() if path.is_file() else []
    return "\n".join("    " + line for line in text[-lines:])


def run_local(config: dict, name: str, count: int | None, extra: list[str],
              out_dir: Path | None = None) -> list[dict]:
    """Run the sweep here, trial by trial; returns the trial rows (also written as CSV)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sweeps import SweepConfig, next_run
    if count is None and config["method"] != "grid":
        raise SweepError(f"a {config['method']} sweep has no natural end: say how many trials "
                         f"to run with --count N (make sweep COUNT=N)")
    engine_config = SweepConfig(config)
    metric = (config.get("metric") or {}).get("name")
    goal = (config.get("metric") or {}).get("goal", "minimize")

    first = next_run(engine_config, [])
    if first is None:
        raise SweepError("the sweep proposes no trials")
    parsed = parse_probes(config, engine_config, extra)
    runs_dir = Path(parsed.get("runs_dir") or "runs") if parsed else Path("runs")
    out_dir = out_dir or runs_dir / "sweeps" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # One starting checkpoint for every trial (not each trial's own `auto`, which a front-end
    # trained meanwhile, by this sweep or another, would change).
    start_from = ensure_previous_stage(parsed, extra, out_dir) if parsed else None
    if start_from is not None:
        print(f"init_from: auto -> {start_from}: every trial starts from it", flush=True)
        extra = [*extra, f"--model.init_from={start_from}"]
    init_from = start_from or ((parsed or {}).get("model") or {}).get("init_from")  # trials.csv
    columns = {"init_from": init_from and str(init_from)} if parsed else {}

    runs, rows, proposal, interrupted = [], [], first, False
    while proposal is not None and (count is None or len(rows) < count):
        trial = run_trial(config, proposal.config, len(rows), extra, out_dir, columns,
                          name=name, count=count, metric=metric, goal=goal)
        if trial is None:  # Ctrl-C
            interrupted = True
            break
        run, row = trial
        runs.append(run)
        rows.append(row)
        proposal = next_run(engine_config, runs)

    rows = sort_rows(rows, metric or "metric", goal)
    show_results(rows, out_dir)
    if interrupted:
        raise SystemExit(130)
    if rows and all(row["state"] != "finished" for row in rows):
        raise SweepError(f"every trial failed; see the logs in {out_dir}")
    return rows


def parse_probes(config: dict, engine_config, extra: list[str]) -> dict | None:
    """The trial command parsed with each of :func:`probes`' parameter sets (the last one's
    config is returned); a SweepError when the extra arguments set a swept parameter again."""
    parsed, clash = None, {}
    for probe in probes(engine_config):  # whichever values the proposals will take
        parsed = parse_trial(trial_argv(config, probe, extra))
        clash = {**(overridden(parsed, probe) if parsed else {}), **clash}  # each name once
    if clash:
        raise SweepError(
            "the arguments after the sweep file set swept parameters again: "
            f"{'; '.join(clash.values())}."
            " Every trial would run the same value: leave them out of the extra arguments "
            "(e.g. a --config that sets them)")
    return parsed


def run_trial(config: dict, params: dict, index: int, extra: list[str], out_dir: Path,
              columns: dict, *, name: str, count: int | None, metric: str | None,
              goal: str):
    """Run trial ``index`` with the proposed ``params``: its sweep-engine run and its row of
    trials.csv (``columns`` added after the parameters); None when Ctrl-C stopped it."""
    from sweeps import RunState, SweepRun

    trial = f"trial-{index:03d}"
    summary_path, log = out_dir / f"{trial}.json", out_dir / f"{trial}.log"
    argv = trial_argv(config, params, extra, out_dir / f"{trial}.args.json")
    if "${args_json_file}" in (config.get("command") or []):
        (out_dir / f"{trial}.args.json").write_text(agent_args(params)["args_json"][0])
    values = {k: plain(v["value"]) for k, v in params.items()}
    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    print(f"[{name}] trial {index + 1}{'' if count is None else f'/{count}'}: {shown}",
          flush=True)
    start = time.time()
    try:
        code = run_logged(argv, log, trial_env(summary_path, out_dir, name))
    except KeyboardInterrupt:  # the trial is killed; keep what finished
        print("  interrupted", flush=True)
        return None
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    state = RunState.finished if code == 0 and summary else RunState.failed
    run = SweepRun(name=trial, config=params, state=state,
                   summary_metrics=summary.get("metrics") or {},
                   history=summary.get("history") or [])
    logged = {key for row in [run.summary_metrics, *run.history] for key in row}
    if state == RunState.finished and metric and metric not in logged:
        shown = ", ".join(sorted(key for key in logged if not key.startswith("_")))
        raise SweepError(f"trial {index + 1} finished without logging the sweep's metric "
                         f"'{metric}': correct metric.name in the sweep config; the trial "
                         f"logged: {shown or 'nothing'} (log {log})")
    score = best_value(run, metric, goal)
    row = {"trial": index, "state": state.value, metric or "metric": score,
           **{k: json.dumps(v) if isinstance(v, list) else v for k, v in values.items()},
           **columns, "seconds": round(time.time() - start, 1), "run": summary.get("run", ""),
           "log": str(log)}
    if state == RunState.failed:
        print(f"  failed (exit {code}), log {log}:\n{tail(log)}", flush=True)
    else:
        print(f"  {metric} = {score}  ({row['seconds']} s, {row['run']})", flush=True)
    return run, row


def show_results(rows: list[dict], out_dir: Path) -> None:
    """Write trials.csv, print the table and the command that uploads the offline W&B runs."""
    write_csv(rows, out_dir / "trials.csv")
    print(f"\n{format_rows(rows)}\n\ntrials: {out_dir / 'trials.csv'}")
    offline = [str(path) for row in rows if row["run"]
               for path in sorted(Path(row["run"]).glob("wandb/offline-run-*"))]
    if offline:
        print(f"upload the trials' offline W&B runs: {shlex.join(['wandb', 'sync', *offline])}")


def best_value(run, metric: str | None, goal: str) -> float | None:
    """The best value of the metric over the trial's history and summary (as bayes uses it)."""
    if not metric:
        return None
    try:
        value = float(run.metric_extremum(metric, "max" if goal == "maximize" else "min"))
    except (ValueError, KeyError, TypeError):
        return None
    return None if math.isnan(value) else round(value, 4)


def sort_rows(rows: list[dict], metric: str, goal: str) -> list[dict]:
    sign = -1 if goal == "maximize" else 1
    return sorted(rows, key=lambda r: (r[metric] is None, sign * (r[metric] or 0), r["trial"]))


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def format_rows(rows: list[dict]) -> str:
    columns = [c for c in dict.fromkeys(k for row in rows for k in row)
               if c not in ("log", "init_from")]  # printed before the first trial
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("-" if row.get(c) is None else str(row.get(c))
                                       for c in columns) + " |")
    return "\n".join(lines)


# ---- with a W&B server ------------------------------------------------------------------------
def run_server(config: dict, count: int | None, extra: list[str], project: str,
               entity: str | None) -> None:
    """Create the sweep on the W&B server and run an agent here (like `wandb sweep` + agent)."""
    from dilatedseg.loggers import wandb_logged_in

    if not wandb_logged_in():
        raise SweepError("a sweep without --local needs a W&B server and account: run "
                         "`wandb login` first (or export WANDB_API_KEY), or run it here "
                         "without one: dilatedseg sweep <config> --local --count N")
    import wandb

    if extra:
        config = {**config, "command": list(config.get("command") or DEFAULT_COMMAND) + extra}
    sweep_id = wandb.sweep(config, project=project, entity=entity)
    print(f"sweep {sweep_id}: more agents can join with `wandb agent "
          f"{entity + '/' if entity else ''}{project}/{sweep_id}`", flush=True)
    wandb.agent(sweep_id, project=project, entity=entity, count=count)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="dilatedseg sweep", allow_abbrev=False,
        description="Run a W&B sweep config. Arguments after the options go to every trial.")
    parser.add_argument("config", help="sweep config, e.g. sweeps/dilations.yaml")
    parser.add_argument("--local", action="store_true",
                        help="no W&B server: propose trials with the open-source sweep engine")
    parser.add_argument("--count", type=int, default=None,
                        help="number of trials (default: all of a grid; required otherwise "
                             "with --local)")
    parser.add_argument("--project", help="W&B project (default: WANDB_PROJECT, else the "
                        "config's project, else dilatedseg)")
    parser.add_argument("--entity", help="W&B entity (default: WANDB_ENTITY, else the "
                        "config's entity, else your default entity)")
    parser.add_argument("--out", default=None,
                        help="--local: folder for logs and trials.csv "
                             "(default <runs_dir>/sweeps/<name>-<time>)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.count is not None and args.count < 1:
        parser.error("--count must be >= 1")
    config = load_sweep(args.config)
    name = config.get("name") or Path(args.config).stem
    if args.local:
        run_local(config, name, args.count, extra, Path(args.out) if args.out else None)
    else:  # in the order `wandb sweep` takes them
        project = (args.project or os.environ.get("WANDB_PROJECT") or config.get("project")
                   or "dilatedseg")
        entity = args.entity or os.environ.get("WANDB_ENTITY") or config.get("entity")
        run_server(config, args.count, extra, project, entity)
