"""The front-end's dilated convolutions on a GPU, several ways: which ones are fast?

    python3 benchmarks/conv_variants.py [--per-case 25] [--deadline 170]

Cases: fc6 (512 -> 4096, 7x7, dilation 4) and conv5 (512 -> 512, 3x3, dilation 2) on the inputs
they see for a 512x1024 training crop, forward + backward in bf16, as the plain dilated
convolution (cuDNN), through space-to-batch (``SpaceToBatchConv2d``: an undilated convolution on
the d x d sub-grids) and as im2col + one GEMM, in NHWC or NCHW, with cuDNN autotuning off or on.
Each case runs in its own process under its own time limit, so one pathological kernel cannot
hide the others; it prints the first call (autotuning included) and the best of 3 after it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

CASES = [  # (layer, batch, way, layout, autotune)
    ("fc6", 2, "dilated", "NHWC", False),
    ("fc6", 2, "space-to-batch", "NHWC", False),
    ("fc6", 2, "im2col", "NHWC", False),
    ("fc6", 2, "dilated", "NCHW", False),
    ("fc6", 2, "space-to-batch", "NHWC", True),
    ("fc6", 2, "dilated", "NHWC", True),
    ("conv5", 8, "dilated", "NHWC", False),
    ("conv5", 8, "space-to-batch", "NHWC", False),
    ("conv5", 8, "dilated", "NCHW", False),
    ("fc6", 8, "space-to-batch", "NHWC", False),
]
LAYERS = {"fc6": (512, 4096, 7, 4, (88, 152)), "conv5": (512, 512, 3, 2, (100, 164))}


def measure(index: int, device: str = "cuda", layers: dict | None = None) -> None:
    """Case ``index`` of CASES on ``device``, with the layer shapes of ``layers`` (default
    LAYERS; the tests pass small ones to run every case on the CPU)."""
    import torch
    from common import backward_step, timed
    from profile_fc6 import WAYS

    from dilatedseg.flops import conv_macs

    layer, batch, way, layout, autotune = CASES[index]
    cin, cout, kernel, dilation, (h, w) = (layers or LAYERS)[layer]
    torch.backends.cudnn.benchmark = autotune
    memory = torch.channels_last if layout == "NHWC" else torch.contiguous_format
    conv = WAYS[way](cin, cout, kernel, dilation=dilation).to(device).to(memory_format=memory)
    x = torch.randn(batch, cin, h, w, device=device).to(memory_format=memory).requires_grad_()
    out_h, out_w = h - dilation * (kernel - 1), w - dilation * (kernel - 1)
    # forward, weight gradient and input gradient: three times the forward's work
    tflop = 3 * 2 * batch * conv_macs(cin, cout, kernel, out_h, out_w) / 1e12
    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

    def step():
        backward_step(conv, x, autocast)

    first = timed(step, x.device, reps=1, warmup=0)  # cuDNN's choice (autotuning) included
    best = timed(step, x.device, reps=3, warmup=0)
    print(f"RESULT first {first.best * 1e3:.1f} ms, best {best.best * 1e3:.2f} ms, "
          f"{tflop / best.best:.0f} TFLOP/s ({tflop:.3g} TFLOP fwd+bwd)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--per-case", type=float, default=25.0, help="seconds per case")
    parser.add_argument("--deadline", type=float, default=170.0, help="seconds in all")
    args = parser.parse_args(argv)
    if args.case is not None:
        return measure(args.case)
    end = time.monotonic() + args.deadline
    print("| layer | batch | way | layout | cuDNN autotune | result |\n|---|---|---|---|---|---|",
          flush=True)
    for index, (layer, batch, way, layout, autotune) in enumerate(CASES):
        left = end - time.monotonic()
        if left < 5:
            result = "not run (deadline)"
        else:
            try:
                done = subprocess.run([sys.executable, __file__, "--case", str(index)],
                                      capture_output=True, text=True,
                                      timeout=min(args.per_case, left))
                lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT")]
                result = lines[0][7:] if lines else "failed: " + done.stderr[-200:].replace(
                    "\n", " ")
            except subprocess.TimeoutExpired:
                result = f"over {min(args.per_case, left):.0f} s (killed)"
        print(f"| {layer} | {batch} | {way} | {layout} | {autotune} | {result} |", flush=True)


if __name__ == "__main__":
    main()
