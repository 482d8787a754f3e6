"""`python -m dilatedseg.report`: the paper's findings reproduced on one dataset, as a report.

    python -m dilatedseg.report --dataset shapes --out reports/shapes [--runs_dir runs/report]
                                [--quick] [--count N] [EXTRA CLI ARGS...]      (make report)

Every number comes from runs made here, through the real `dilatedseg fit` (in this process, CSV
logging, under ``--runs_dir``), with the dataset's configs (conf/<dataset>.yaml +
conf/stage/<stage>.yaml [+ conf/<dataset>/<stage>.yaml]) and their fixed seed:

1. the front-end;
2. context modules on its frozen logits: basic and large, identity and random initialisation
   (the large ones with conf/<dataset>/context_large.yaml on top, when the dataset has it);
3. CRF-RNN (the crf stage, trained end to end) from the front-end, basic and large rows;
4. a fixed dense CRF as post-processing on each row's best checkpoint;
5. the dilation-schedule sweep ``sweeps/report_dilations.yaml`` through the local sweep runner;
6. figures (:mod:`dilatedseg.report_figures`): training curves, mIoU against receptive field,
   effective receptive fields, predictions next to ground truth.

Output: ``<out>/report.md``, ``<out>/*.png`` and ``<out>/results.json``. EXTRA arguments go to
every run (e.g. ``--data.init_args.root=...``). ``--quick`` shrinks every stage to one short
epoch and the sweep to two trials (for tests and smoke checks; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from dilatedseg.openmp import shorten_openmp_spinning

shorten_openmp_spinning()  # before torch loads

import numpy as np
import torch
import yaml

from dilatedseg import cli
from dilatedseg.cli import PACKAGE_CONF, PACKAGE_ROOT, import_class, project_file
from dilatedseg.cli import main as cli_main
from dilatedseg.data.base import DataError
from dilatedseg.metrics import argmax_classes
from dilatedseg.models.context import ContextModule, receptive_field, resolve_dilations
from dilatedseg.models.frontend import OUTPUT_STRIDE
from dilatedseg.models.frontend import receptive_field as frontend_receptive_field
from dilatedseg.runs import RunError
from dilatedseg.summary import SUMMARY_PATH_ENV
from dilatedseg.sweep import SweepError, load_sweep, parse_trial, run_local

REPORT_SWEEP = "report_dilations.yaml"
ROWS = ("frontend", "basic", "large")
ROW_NAMES = {"frontend": "Front end", "basic": "+ Basic context", "large": "+ Large context"}
QUICK_ARGS = ["--trainer.max_epochs=1", "--trainer.max_steps=-1",
              "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
              "--trainer.num_sanity_val_steps=0"]
QUICK_CRF = {"iterations": 1, "test_iterations": 1}  # mean-field steps of --quick CRFs
QUICK_TRIALS = 2
VIEW_IMAGES = 4  # val images in the predictions figure
GRADIENT_IMAGES = 8  # val images averaged in the receptive-field pictures


class ReportError(Exception):
    """The report cannot go on; the message says why."""


# ---- configs and runs ---------------------------------------------------------------------------
def conf_root(dataset: str) -> Path:
    """conf/ of the working directory when it has the dataset, else the package checkout's."""
    config = project_file(f"conf/{dataset}.yaml")
    if config is not None:
        return config.parent
    known = sorted(p.stem for p in PACKAGE_CONF.glob("*.yaml") if p.stem not in ("base", "debug"))
    raise ReportError(f"no config conf/{dataset}.yaml; datasets: {', '.join(known)}")


def stage_configs(dataset: str, stage: str) -> list[str]:
    """--config arguments of a stage (see :func:`dilatedseg.cli.stage_configs`)."""
    return cli.stage_configs(conf_root(dataset), dataset, stage)


def sweep_file() -> Path:
    """sweeps/report_dilations.yaml of the working directory, else of the package checkout."""
    return project_file(f"sweeps/{REPORT_SWEEP}") or PACKAGE_ROOT / "sweeps" / REPORT_SWEEP


def variant_configs(dataset: str, variant: str) -> list[str]:
    """conf/<dataset>/context_<variant>.yaml when the dataset has one (e.g. a smaller lr for
    the large module), then --model.context_variant."""
    overlay = conf_root(dataset) / dataset / f"context_{variant}.yaml"
    files = ["--config", str(overlay)] if overlay.is_file() else []
    return files + [f"--model.context_variant={variant}"]


def common_args(runs_dir: str, quick: bool, extra: list[str]) -> list[str]:
    """Arguments of every run: where, CSV logging, quiet; then --quick, then the user's."""
    args = [f"--runs_dir={runs_dir}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.init_args.save_dir=unused", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"]
    return args + (QUICK_ARGS if quick else []) + list(extra)


def check_data(dataset: str, args: list[str]) -> None:
    """Fail before any training when the dataset is missing (its own DataError message)."""
    parsed = parse_trial(["dilatedseg", "fit", *stage_configs(dataset, "frontend"), *args])
    datamodule = build_datamodule(parsed["data"])
    datamodule.prepare_data()
    for split in ("train", "val"):
        datamodule.checked_pairs(split)


def fit(name: str, argv: list[str], logs: Path) -> dict:
    """`dilatedseg fit ARGV` in this process; returns the run's summary.json."""
    summary_path = logs / f"{name}.json"
    summary_path.unlink(missing_ok=True)
    print(f"\n== {name}: dilatedseg fit {' '.join(argv)}", flush=True)
    os.environ[SUMMARY_PATH_ENV] = str(summary_path)
    try:
        cli_main(["fit", *argv])
    finally:
        os.environ.pop(SUMMARY_PATH_ENV, None)
    if not summary_path.is_file():
        raise ReportError(f"run '{name}' finished without a summary ({summary_path})")
    summary = json.loads(summary_path.read_text())
    if not summary.get("best_checkpoint"):
        raise ReportError(f"run '{name}' saved no best checkpoint ({summary['run']})")
    print(f"== {name}: best val mIoU {summary['best_val_mIoU']} in {summary['seconds']} s",
          flush=True)
    return summary


def run_config(summary: dict) -> dict:
    return yaml.safe_load((Path(summary["run"]) / "config.yaml").read_text())


# ---- models from checkpoints ---------------------------------------------------------------------
def load_model(checkpoint: str, crf: str | None = None, crf_options: dict | None = None):
    """The trained SegmentationModule of a checkpoint (eval mode, CPU), optionally with a fixed
    dense CRF added (its parameters are not in the checkpoint, hence the non-strict load).

    In process, for the report's tables; from the shell the same is
    `dilatedseg validate --ckpt_path X --model.crf=dense`.
    """
    from dilatedseg.module import SegmentationModule

    overrides = {} if crf is None else {"crf": crf, "crf_options": crf_options}
    module = SegmentationModule.load_from_checkpoint(checkpoint, map_location="cpu",
                                                     strict=crf is None, **overrides)
    return module.eval()


def build_datamodule(data: dict):
    """The data module of a config's ``data`` section (class_path, init_args)."""
    return import_class(data["class_path"])(**(data.get("init_args") or {}))


def datamodule_of(summary: dict):
    return build_datamodule(run_config(summary)["data"])


def validate(summary: dict, crf: str | None = None, crf_options: dict | None = None) -> float:
    """Val mIoU of a run's best checkpoint (with the data and batch limits of that run)."""
    import lightning as L

    limit = run_config(summary)["trainer"].get("limit_val_batches")
    trainer = L.Trainer(accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1.0 if limit is None else limit)
    result = trainer.validate(load_model(summary["best_checkpoint"], crf, crf_options),
                              datamodule=datamodule_of(summary), verbose=False)
    return round(float(result[0]["val/mIoU"]), 2)


@torch.no_grad()
def predict(module, images: torch.Tensor) -> np.ndarray:
    """(N, H, W) uint8 predictions of a module on 0-255 RGB images (tiled as it evaluates)."""
    return argmax_classes(module.image_logits(images)).to(torch.uint8).numpy()


# ---- receptive fields ----------------------------------------------------------------------------
def image_gradient(segmenter, images: torch.Tensor, cell: tuple[int, int]) -> np.ndarray:
    """Mean |d logit / d image| (H, W) of the coarse output at ``cell`` (its argmax class)."""
    images = images.to(torch.float32, copy=True).requires_grad_(True)
    logits = segmenter.coarse_logits(images)
    y, x = cell
    picked = logits[:, :, y, x]
    picked.gather(1, picked.argmax(1, keepdim=True)).sum().backward()
    return images.grad.abs().sum(1).mean(0).numpy()


def context_gradient(context: ContextModule) -> np.ndarray:
    """|d output / d input| of a context module's centre output cell on a map 2 cells wider
    than its receptive field on every side, summed over channels, on positive random input
    (float64, so no tap underflows to zero)."""
    size = receptive_field(context.dilations) + 4
    context = context.double()
    generator = torch.Generator().manual_seed(0)
    inputs = (torch.rand(1, context.num_classes, size, size, generator=generator,
                         dtype=torch.float64) + 0.5).requires_grad_(True)
    output = context(inputs)
    output[0, :, size // 2, size // 2].sum().backward()
    return inputs.grad[0].abs().sum(0).numpy()


def schedule_label(value) -> tuple[str, tuple[int, ...]]:
    """A sweep row's model.dilations (preset name or JSON list) -> (label, dilations)."""
    if isinstance(value, str) and value.strip().startswith("["):
        value = json.loads(value)
    dilations = resolve_dilations(value)
    label = ",".join(map(str, dilations))
    return (f"{value} ({label})" if isinstance(value, str) else label), dilations


# ---- the report --------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip()
                 for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value):
        if value is None:
            return "-"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def sweep_points(trials: list[dict], field_fe: int) -> list[dict]:
    """One point per dilation-sweep trial: schedule, receptive field, mIoU, best checkpoint."""
    points = []
    for trial in sorted(trials, key=lambda t: t["trial"]):
        label, dilations = schedule_label(trial["model.dilations"])
        cells = receptive_field(dilations)
        summary_file = Path(trial["run"]) / "summary.json" if trial["run"] else None
        points.append({
            "label": label, "dilations": list(dilations), "field_cells": cells,
            "field_px": field_fe + OUTPUT_STRIDE * (cells - 1), "miou": trial["val/mIoU"],
            "seconds": trial["seconds"],
            "checkpoint": (json.loads(summary_file.read_text())["best_checkpoint"]
                           if summary_file and summary_file.is_file() else None)})
    return points


def val_examples(datamodule, count: int) -> tuple[torch.Tensor, list[np.ndarray]]:
    """The first ``count`` val images (N, 3, h, w) and their labels, cut at the top left to
    the smallest size among them, so they batch (VOC's or KITTI's images differ in size)."""
    datamodule.setup("validate")
    val = datamodule.datasets["val"]
    items = [val[i] for i in range(min(len(val), count))]
    height = min(item["image"].shape[-2] for item in items)
    width = min(item["image"].shape[-1] for item in items)
    images = torch.stack([item["image"][..., :height, :width] for item in items])
    return images, [item["label"][:height, :width].numpy() for item in items]


def draw_figures(out: Path, frontend: dict, context: dict, models: dict, rnn: dict,
                 points: list[dict], field_fe: int, crf_options: dict | None) -> None:
    """The four figures: training curves by initialisation, mIoU against receptive field,
    receptive fields by gradient, predictions per model."""
    from dilatedseg import report_figures as figures

    figures.training_curves(
        {f"{variant}, {init}": context[variant, init]["history"]
         for variant in ("basic", "large") for init in ("identity", "random")},
        out / "init_curves.png")
    figures.miou_vs_receptive_field(points, frontend["best_val_mIoU"], field_fe,
                                    out / "dilation_sweep.png")
    datamodule = datamodule_of(frontend)
    images, truths = val_examples(datamodule, max(VIEW_IMAGES, GRADIENT_IMAGES))
    truths = truths[:VIEW_IMAGES]

    cell = (images.shape[-2] // OUTPUT_STRIDE // 2, images.shape[-1] // OUTPUT_STRIDE // 2)
    centre = tuple(OUTPUT_STRIDE * c + (OUTPUT_STRIDE - 1) / 2 for c in cell)
    columns = [{"label": "front-end", "field_px": field_fe, "centre": centre,
                "image_map": image_gradient(load_model(frontend["best_checkpoint"]).model,
                                            images[:GRADIENT_IMAGES], cell),
                "context_map": None, "field_cells": 1}]
    for point in points:
        if point["checkpoint"] is None:
            continue
        trained = load_model(point["checkpoint"]).model
        identity = ContextModule(trained.context.num_classes, dilations=point["dilations"])
        columns.append({"label": point["label"], "field_px": point["field_px"], "centre": centre,
                        "image_map": image_gradient(trained, images[:GRADIENT_IMAGES], cell),
                        "context_map": context_gradient(identity),
                        "field_cells": point["field_cells"]})
    figures.receptive_fields(columns, images[0].permute(1, 2, 0).numpy() / 255,
                             out / "receptive_fields.png")

    shown = images[:VIEW_IMAGES]
    panels = {
        "front-end": predict(load_model(frontend["best_checkpoint"]), shown),
        "+ basic": predict(load_model(models["basic"]["best_checkpoint"]), shown),
        "+ large": predict(load_model(models["large"]["best_checkpoint"]), shown),
        "+ large, dense CRF": predict(
            load_model(models["large"]["best_checkpoint"], "dense", crf_options), shown),
        "+ large, CRF-RNN": predict(load_model(rnn["large"]["best_checkpoint"]), shown),
    }
    figures.predictions([im.permute(1, 2, 0).numpy().astype(np.uint8) for im in shown], truths,
                        panels, datamodule.palette, datamodule.classes, out / "predictions.png")


def context_args(dataset: str, variant: str, init: str, args: list[str],
                 start_from: str) -> list[str]:
    """The fit arguments of a context module of ``variant`` with ``init`` initialisation on
    the front-end's frozen logits."""
    return (stage_configs(dataset, "context") + variant_configs(dataset, variant) + args
            + [start_from, f"--model.context_init={init}"])


def crf_rnn_args(dataset: str, row: str, source: dict, args: list[str],
                 quick: bool) -> list[str]:
    """The fit arguments of the crf stage trained end to end from a table row's model
    (``source``: its summary)."""
    row_args = [f"--model.init_from={source['best_checkpoint']}"]
    row_args += (["--model.stage=frontend"] if row == "frontend"
                 else [f"--model.context_variant={row}"])  # the crf stage's own lr
    if quick:
        row_args.append(f"--model.crf_options={json.dumps(QUICK_CRF)}")
    return stage_configs(dataset, "crf") + args + row_args


def run_report(dataset: str, out: Path, runs_dir: str, quick: bool, count: int | None,
               extra: list[str]) -> dict:
    start = time.time()
    args = common_args(runs_dir, quick, extra)
    check_data(dataset, args)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(runs_dir) / dataset / "report"
    logs.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def timed(name, function, *a, **k):
        began = time.time()
        value = function(*a, **k)
        timings[name] = round(time.time() - began + timings.get(name, 0.0), 1)
        return value

    # 1-2. front-end, then context modules on its frozen logits.
    frontend = timed("front-end", fit, "frontend", stage_configs(dataset, "frontend") + args, logs)
    start_from = f"--model.init_from={frontend['best_checkpoint']}"
    context = {(variant, init): timed("context", fit, f"context-{variant}-{init}",
                                      context_args(dataset, variant, init, args, start_from),
                                      logs)
               for variant in ("basic", "large") for init in ("identity", "random")}
    models = {"frontend": frontend, "basic": context["basic", "identity"],
              "large": context["large", "identity"]}

    # 3. CRF-RNN trained end to end from each row's model (front-end row: no context module).
    rnn = {row: timed("CRF-RNN", fit, f"crf-rnn-{row}",
                      crf_rnn_args(dataset, row, source, args, quick), logs)
           for row, source in models.items()}

    # 4. Fixed dense CRF as post-processing of each row's best checkpoint.
    print("\n== dense CRF post-processing of each row's best checkpoint", flush=True)
    crf_options = QUICK_CRF if quick else None
    dense = {row: timed("dense CRF", validate, source, "dense", crf_options)
             for row, source in models.items()}

    # 5. Dilation schedules through the local sweep runner, on the same front-end.
    sweep = load_sweep(str(sweep_file()))
    sweep["command"] = ["dilatedseg", "fit", *stage_configs(dataset, "context"), "${args}"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    sweep_dir = Path(runs_dir) / "sweeps" / f"report_dilations-{dataset}-{stamp}"
    print(f"\n== dilation sweep ({sweep_dir})", flush=True)
    trials = timed("sweep", run_local, sweep, "report_dilations",
                   QUICK_TRIALS if quick and count is None else count,
                   args + [start_from, "--data.init_args.num_workers=0"], sweep_dir)
    field_fe = frontend_receptive_field(run_config(frontend)["model"]["arch"])
    points = sweep_points(trials, field_fe)

    # 6. Figures.
    print("\n== figures", flush=True)
    began = time.time()
    draw_figures(out, frontend, context, models, rnn, points, field_fe, crf_options)
    timings["figures"] = round(time.time() - began, 1)

    results = {
        "dataset": dataset, "quick": quick, "machine": machine(),
        "seconds": round(time.time() - start, 1), "timings": timings,
        "table": {row: {"none": models[row]["best_val_mIoU"], "dense": dense[row],
                        "rnn": rnn[row]["best_val_mIoU"]} for row in ROWS},
        "init": {f"{v}-{i}": {"best": s["best_val_mIoU"],
                              "first_epoch": (s["history"] or [{}])[0].get("val/mIoU"),
                              "epochs": s["epochs"]}
                 for (v, i), s in context.items()},
        "sweep": [{k: v for k, v in p.items() if k != "checkpoint"} for p in points],
        "frontend_field_px": field_fe,
        "runs": {"frontend": frontend["run"],
                 **{f"context-{v}-{i}": s["run"] for (v, i), s in context.items()},
                 **{f"crf-rnn-{row}": s["run"] for row, s in rnn.items()},
                 "sweep": str(sweep_dir)},
        "command": " ".join(["python -m dilatedseg.report", *sys.argv[1:]]),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(render(results))
    print(f"\nreport: {out / 'report.md'} ({results['seconds']} s)")
    return results


def render(results: dict) -> str:
    """report.md from results.json."""
    table = results["table"]
    minutes = results["seconds"] / 60
    lines = [
        f"# Dilated context aggregation on `{results['dataset']}`: the paper's findings",
        "",
        f"Generated by `{results['command']}` in {minutes:.1f} min on {results['machine']}."
        + (" **Quick mode: tiny budget, the numbers mean nothing.**" if results["quick"] else ""),
        "All numbers are validation mIoU (%) of runs made by that command (fixed seeds).",
        "",
        "## Front end, context module and CRF (the paper's Table 3)",
        "",
        "Rows: the front-end alone, then a basic / large identity-initialised context module",
        "trained on its frozen logits. Columns: no CRF; a fixed dense CRF as post-processing of",
        "the row's best checkpoint; CRF-RNN, i.e. the crf stage trained end to end (front-end,",
        "context module and CRF together, as in the paper) from the row's model.",
        "",
        markdown_table(["", "no CRF", "+ dense CRF", "+ CRF-RNN"],
                       [[ROW_NAMES[row], table[row]["none"], table[row]["dense"],
                         table[row]["rnn"]] for row in ROWS]),
        "",
        "![predictions](predictions.png)",
        "",
        "## Identity vs random initialisation of the context module",
        "",
        "The same context stage, initialised with the paper's identity initialisation or with",
        "random (Kaiming) weights.",
        "",
        markdown_table(["module", "init", "val mIoU after epoch 1", "best val mIoU", "epochs"],
                       [[name.split("-")[0], name.split("-")[1], row["first_epoch"],
                         row["best"], row["epochs"]] for name, row in results["init"].items()]),
        "",
        "![training curves](init_curves.png)",
        "",
        "## Dilation schedule and receptive field",
        "",
        f"Basic identity-initialised context modules with different dilation schedules on the "
        f"same front-end (receptive field {results['frontend_field_px']} px), via the local "
        "sweep runner (`sweeps/report_dilations.yaml`). Receptive field of one output: "
        "front-end field + 8 x (context field in cells - 1).",
        "",
        markdown_table(["schedule", "context field (cells)", "receptive field (px)",
                        "val mIoU", "time (s)"],
                       [[p["label"], p["field_cells"], p["field_px"], p["miou"], p["seconds"]]
                        for p in sorted(results["sweep"], key=lambda p: p["field_cells"])]),
        "",
        "![mIoU against receptive field](dilation_sweep.png)",
        "",
        "Effective receptive fields. Top: |gradient| of the centre output's logit with respect",
        "to the input image, averaged over val images, for each trained model; the square is the",
        "theoretical receptive field. Bottom: the context module alone at identity",
        "initialisation, log10 |gradient| of the centre output cell with respect to its input.",
        "",
        "![receptive fields](receptive_fields.png)",
        "",
        "## Time",
        "",
        markdown_table(["step", "seconds"], [[k, v] for k, v in results["timings"].items()]),
        "",
        "Runs: " + ", ".join(f"`{v}`" for v in results["runs"].values()),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dilatedseg.report", allow_abbrev=False,
        description="Reproduce the paper's ablations on a dataset as a Markdown report. "
                    "Arguments after the options go to every run.")
    parser.add_argument("--dataset", default="shapes")
    parser.add_argument("--out", default=None, help="report folder (default reports/<dataset>)")
    parser.add_argument("--runs_dir", default="runs/report",
                        help="where the report's runs go (kept apart from runs/)")
    parser.add_argument("--quick", action="store_true",
                        help="one short epoch per stage, two sweep trials: a smoke test")
    parser.add_argument("--count", type=int, default=None,
                        help="dilation-sweep trials (default: every schedule)")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    out = Path(args.out or f"reports/{args.dataset}")
    try:
        run_report(args.dataset, out, args.runs_dir, args.quick, args.count, extra)
    except (DataError, RunError, ReportError, SweepError) as error:
        sys.stderr.write(f"error: {error}\n")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
