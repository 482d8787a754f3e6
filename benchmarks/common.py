"""Shared pieces of the benchmarks: result rows, timing, machine description, MFU."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

# A script run as `python3 benchmarks/x.py` has only benchmarks/ on its path: every script
# imports this module first, so the checkout's package is found, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dilatedseg.cli import stage_configs  # noqa: E402
from dilatedseg.flops import gpu_peak_tflops  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"

NO_CUDA = "not measured (no CUDA device)"
H100_BF16_TFLOPS = 989.0


@dataclass
class Row:
    """One figure: ``ms`` per iteration of ``batch`` items (None = not measured, see note)."""

    bench: str
    case: str
    device: str
    precision: str = "fp32"
    batch: int | None = None
    ms: float | None = None
    throughput: float | None = None
    unit: str = "img/s"
    tflop: float | None = None  # work per iteration (analytic)
    tflops: float | None = None  # achieved
    mfu: float | None = None
    note: str = ""
    median_ms: float | None = None  # median of the timed runs, where ``ms`` is their best
    runs: int | None = None  # how many timed runs ``ms`` (best) and ``median_ms`` are of

    def as_dict(self) -> dict:
        return asdict(self)


def recipe_model_args(dataset: str, stage: str, **overrides) -> dict:
    """The ``model`` options of ``make train STAGE=<stage> DATASET=<dataset>``: conf/base.yaml,
    then the stage's config files in :func:`~dilatedseg.cli.stage_configs`' order (later files
    win, key by key), then ``overrides``; without the weights to start from (``pretrained``,
    ``init_from``: a benchmark times the work, not the weights)."""
    files = [CONF / "base.yaml", *map(Path, stage_configs(CONF, dataset, stage)[1::2])]
    model = {}
    for path in files:
        model.update((yaml.safe_load(path.read_text()) or {}).get("model") or {})
    model.pop("init_from", None)
    model["pretrained"] = None
    return {**model, **overrides}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the figures ran on."""
    info = {"cpu": cpu_model(), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    if info["gpu"]:
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    """Dense peak of ``device`` at ``precision`` ("bf16" or "fp32"): fp32 convolutions on a GPU
    run as TF32 when cuDNN allows it (PyTorch's default)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    key = precision
    if precision == "fp32" and torch.backends.cudnn.allow_tf32:
        key = "tf32"
    return gpu_peak_tflops(torch.cuda.get_device_name(device), key)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``runs`` timed calls: the ``best`` (other load on the machine only
    ever adds time) and the ``median``."""

    best: float
    median: float
    runs: int

    def scaled(self, factor: float) -> Timing:
        """The same runs, each multiplied by ``factor`` (e.g. per item of a call)."""
        return Timing(self.best * factor, self.median * factor, self.runs)

    def describe(self) -> str:
        """'best of N, median X ms' (or '1 run')."""
        if self.runs == 1:
            return "1 run"
        return f"best of {self.runs}, median {self.median * 1e3:.1f} ms"


def timed(fn: Callable[[], object], device: torch.device, reps: int, warmup: int = 1) -> Timing:
    """Wall-clock seconds of ``fn`` over ``reps`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return Timing(min(times), statistics.median(times), len(times))


def backward_step(module: torch.nn.Module, inputs: torch.Tensor, autocast) -> None:
    """One training step's work: forward under ``autocast``, backward of a mean-square loss of
    the output (it costs nothing next to the network), gradients cleared."""
    with autocast:
        out = module(inputs)
    out.float().square().mean().backward()
    module.zero_grad(set_to_none=True)
    inputs.grad = None


def compute_row(bench: str, case: str, device: torch.device, precision: str, batch: int,
                timing: Timing, macs: int, peak: float | None, note: str = "") -> Row:
    """A measured row: throughput, achieved TFLOP/s and MFU from analytic ``macs`` per item,
    of the best run; the note says so, with the median run's time and MFU."""
    tflop = 2 * macs * batch / 1e12
    achieved = tflop / timing.best
    if device.type == "cuda" and precision == "fp32" and torch.backends.cudnn.allow_tf32:
        precision = "fp32 (TF32 convs)"  # what cuDNN computes, and the peak MFU is taken of
    spread = timing.describe()
    if peak and timing.runs > 1:
        spread += f" ({tflop / timing.median / peak:.1%} MFU)"
    note = "; ".join(x for x in (spread, note) if x)
    return Row(bench, case, device_label(device), precision, batch, timing.best * 1e3,
               batch / timing.best, "img/s", tflop, achieved,
               achieved / peak if peak else None, note, timing.median * 1e3, timing.runs)


def not_measured(bench: str, case: str, precision: str, batch: int, macs: int,
                 note: str = "") -> Row:
    """A GPU row on a machine without one: the work and the H100 bf16 compute floor."""
    tflop = 2 * macs * batch / 1e12
    floor = f"H100 bf16 floor {tflop / H100_BF16_TFLOPS * 1e3:.1f} ms"
    return Row(bench, case, "CUDA GPU", precision, batch, tflop=tflop,
               note="; ".join(x for x in (NO_CUDA, floor, note) if x))


def add_row(rows: list[Row], row: Row) -> None:
    """Append ``row`` and print it at once as a table line, so a run cut short keeps it."""
    rows.append(row)
    print(markdown([row]).splitlines()[-1], flush=True)


def markdown(rows: list[Row]) -> str:
    lines = ["| benchmark | case | device | precision | batch | time / iter | throughput "
             "| GFLOP / iter | TFLOP/s | MFU | note |", "|---" * 11 + "|"]
    for r in rows:
        def f(value, fmt):
            return "-" if value is None else format(value, fmt)
        time_s = "-" if r.ms is None else (f"{r.ms:.1f} ms" if r.ms < 1e4 else
                                          f"{r.ms / 1e3:.1f} s")
        gflop = None if r.tflop is None else r.tflop * 1e3
        throughput = "-" if r.throughput is None else f"{r.throughput:.3g} {r.unit}"
        lines.append(f"| {r.bench} | {r.case} | {r.device} | {r.precision} | "
                     f"{f(r.batch, 'd')} | {time_s} | {throughput} | {f(gflop, '.4g')} | "
                     f"{f(r.tflops, '.3g')} | {f(r.mfu, '.1%')} | {r.note} |")
    return "\n".join(lines)


def script_main(run: Callable[..., list[Row]], doc: str) -> None:
    """The command line of a benchmark script whose ``run(device, quick, peak)`` gives rows."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--peak-tflops", type=float)
    args = parser.parse_args()
    print(markdown(run(bench_device(), args.quick, args.peak_tflops)))


def bench_device() -> torch.device:
    """The GPU if there is one, else the CPU. cuDNN autotuning stays off (PyTorch's default, and
    the recipes'): on an H200 it spent over 22 s per fc6 convolution, stalling the sections."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
