"""Context module forward / forward+backward: basic and large (Dilation8, VOC's 21 classes) and
basic Dilation10 (Cityscapes' 19), on 64x64 (a VOC image at 1/8) and 128x256 (a Cityscapes
image at 1/8) logit maps.

    python3 benchmarks/context.py [--quick]      # or through benchmarks/run.py

The module does little arithmetic per kernel launch (the basic one is 64 C^2 weights), so on a
GPU it is launch-bound: the MFU column shows how far, and the ``compiled`` rows (torch.compile,
which fuses bias + ReLU and, in ``reduce-overhead`` mode, replays the step as one CUDA graph)
show what it buys (with ``--quick``, for the forward rows only: each compilation takes tens of
seconds).
"""

from __future__ import annotations

import contextlib

import torch
from common import Row, add_row, backward_step, compute_row, peak_tflops, script_main, timed

from dilatedseg.flops import context_macs
from dilatedseg.models import ContextModule

CASES = [("basic", "dilation8", 21), ("large", "dilation8", 21), ("basic", "dilation10", 19)]
SIZES = [(64, 64), (128, 256)]


def context_row(device, variant, schedule, classes, size, batch, mode, precision, reps, peak,
                compile_mode: str | None = None) -> Row:
    torch.manual_seed(0)
    module = ContextModule(classes, variant=variant, dilations=schedule).to(device)
    logits = torch.rand(batch, classes, *size, device=device)
    if device.type == "cuda" and precision == "bf16":
        module = module.to(memory_format=torch.channels_last)
        logits = logits.contiguous(memory_format=torch.channels_last)
    if compile_mode:
        module.compile(mode=compile_mode)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    macs = context_macs(classes, variant, schedule, *size)
    if mode == "forward":
        def step():
            with torch.inference_mode(), autocast:
                module(logits)
        work = macs.total
    else:
        def step():
            backward_step(module, logits, autocast)
        work = macs.training()
    seconds = timed(step, device, reps, warmup=3 if device.type == "cuda" else 1)
    case = f"{variant} {schedule}, C={classes}, {mode} {size[0]}x{size[1]}"
    note = f"compiled ({compile_mode})" if compile_mode else ""
    return compute_row("context module", case, device, precision, batch, seconds, work, peak,
                       note)


def run(device: torch.device, quick: bool = False, peak: float | None = None) -> list[Row]:
    rows = []
    cuda = device.type == "cuda"
    batch = 8 if cuda else 1
    reps = (20 if quick else 50) if cuda else (1 if quick else 3)
    for variant, schedule, classes in CASES:
        for size in SIZES:
            for mode in ("forward", "fwd+bwd"):
                args = (device, variant, schedule, classes, size, batch, mode)
                if not cuda and quick and variant == "large" and size == SIZES[-1]:
                    continue  # ~20 s on 2 cores
                if not cuda:
                    rows.append(context_row(*args, "fp32", reps,
                                            peak_tflops(device, "fp32", peak)))
                    continue
                p = peak_tflops(device, "bf16", peak)
                add_row(rows, context_row(*args, "fp32", reps, peak_tflops(device, "fp32", peak)))
                add_row(rows, context_row(*args, "bf16", reps, p))
                if quick and mode != "forward":
                    continue  # each compilation takes tens of seconds: --quick compiles inference
                try:
                    add_row(rows, context_row(*args, "bf16", reps, p,
                                              compile_mode="reduce-overhead"))
                except Exception as error:  # noqa: BLE001 - a benchmark reports, not fails
                    add_row(rows, Row("context module", f"{variant} {schedule} {mode} "
                                      f"{size[0]}x{size[1]}", rows[-1].device, "bf16", batch,
                                      note=f"torch.compile failed: {type(error).__name__}"))
    return rows


if __name__ == "__main__":
    script_main(run, __doc__)
