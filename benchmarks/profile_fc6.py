"""Which GPU kernels run the dilated fc6 (7x7, dilation 4, 512 -> 4096), and are they tensor-core?

    python3 benchmarks/profile_fc6.py                        # Cityscapes image, bf16, NHWC
    python3 benchmarks/profile_fc6.py --precision fp32 --size 512 512 --no-channels-last
    python3 benchmarks/profile_fc6.py --whole --size 512 1024 --batch 8   # a training step

fc6 is 66-71 % of the front-end's work, so a slow kernel for it caps the whole model's MFU.
The script profiles fc6's forward and backward (torch.profiler) on the input it sees for an
image of ``--size`` (valid geometry) in each of three ways (``WAYS``: the plain dilated
convolution, the space-to-batch path of ``FrontEnd(..., fc6_space_to_batch=True)``, im2col +
GEMM), or with ``--whole`` a whole front-end training step, prints every kernel with its
time and achieved TFLOP/s, and FLAGs convolution / GEMM kernels whose names show no tensor-core
instruction (cuDNN's fp32 ``implicit_convolve_sgemm``, ``dgrad_engine``, ...). Without a GPU it
profiles on the CPU instead (operator names; no tensor cores to check).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import re
import time

import torch
import torch.nn.functional as F
from common import backward_step, sync
from torch.profiler import ProfilerActivity, profile

from dilatedseg.flops import frontend_macs, gpu_peak_tflops
from dilatedseg.models import FrontEnd
from dilatedseg.models.frontend import ARCHITECTURES, SpaceToBatchConv2d

# Kernel-name fragments of tensor-core code (HMMA / GMMA instructions, CUTLASS tensor-op,
# cuDNN's xmma engines), of conv / GEMM kernels, and of memory-bound helpers.
TENSOR_CORE = re.compile(r"xmma|hmma|gmma|wgmma|tensorop|16816|1688|884|bf16|f16|tf32|"
                         r"s1688|h1688|_tc_|cutlass.*sm[89]0", re.I)
CONV_OR_GEMM = re.compile(r"conv|gemm|grad|cudnn|winograd|fft|precomputed|engine", re.I)


# cuDNN names its plain float32 (SIMT) engines xmma too: f32 inputs, f32 compute.
PLAIN_FP32 = re.compile(r"f32f32_f32f32_f32|sgemm", re.I)


def classify_kernel(name: str) -> str:
    """'tensor core', 'FLAG' (a convolution / GEMM kernel without tensor cores) or 'other'."""
    if PLAIN_FP32.search(name) and CONV_OR_GEMM.search(name):
        return "FLAG"
    if TENSOR_CORE.search(name):
        return "tensor core"
    if "elementwise" in name or "reduce" in name.lower():
        return "other"
    return "FLAG" if CONV_OR_GEMM.search(name) else "other"


class Im2colConv2d(torch.nn.Conv2d):
    """A measurement-only third way: unfold (im2col) + one GEMM, output in NHWC order.

    Memory-hungry (the unfolded input is 49x fc6's input) but a plain cuBLAS GEMM, so it shows
    what a GEMM-shaped fc6 would reach next to cuDNN's convolution kernels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        batch, _, height, width = x.shape
        (kh, kw), (dh, dw), (ph, pw) = self.kernel_size, self.dilation, self.padding
        out_h, out_w = height + 2 * ph - dh * (kh - 1), width + 2 * pw - dw * (kw - 1)
        columns = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding)
        weight = self.weight.to(columns.dtype).reshape(self.out_channels, -1)
        y = torch.addmm(self.bias.to(columns.dtype), columns.transpose(1, 2).flatten(0, 1),
                        weight.t())
        return y.view(batch, out_h, out_w, -1).permute(0, 3, 1, 2)


# The ways to compute a dilated convolution that the fc6 profile and conv_variants.py compare.
WAYS = {"dilated": torch.nn.Conv2d, "space-to-batch": functools.partial(SpaceToBatchConv2d,
                                                                    enabled=True),
        "im2col": Im2colConv2d}


def fc6_shapes(height: int, width: int) -> tuple[tuple[int, int, int], int]:
    """((channels, h, w) that fc6 reads, fc6's forward MACs) for one ``height`` x ``width``
    image (valid geometry), from :func:`~dilatedseg.flops.frontend_macs`."""
    layers = {layer.name: layer for layer in frontend_macs("vgg16", height, width).layers}
    return layers["conv5_3"].out_shape, layers["fc6"].macs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="device peak (default: known GPUs)")
    parser.add_argument("--rows", type=int, default=25, help="kernels listed per path")
    parser.add_argument("--whole", action="store_true",
                        help="profile the whole front-end (plain and space-to-batch fc6)")
    parser.add_argument("--arch", choices=list(ARCHITECTURES), default="vgg16",
                        help="--whole's front-end (tiny: a quick check of the code path)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        name = torch.cuda.get_device_name()
        key = "bf16" if args.precision == "bf16" else (
            "tf32" if torch.backends.cudnn.allow_tf32 else "fp32")
        peak = args.peak_tflops or gpu_peak_tflops(name, key)
    else:
        name, peak = "CPU (no CUDA device: operator names only)", args.peak_tflops
    memory = torch.contiguous_format if args.no_channels_last else torch.channels_last
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    layout = "NCHW" if args.no_channels_last else "NHWC"
    if args.whole:  # the whole front-end, as the training benchmark runs it
        macs = args.batch * frontend_macs(args.arch, *args.size, "valid", 19).training()
        print(f"device: {name}; whole {args.arch} front-end, batch {args.batch} at "
              f"{args.size[0]}x{args.size[1]}; {args.precision}, {layout}; "
              f"{2 * macs / 1e12:.4g} TFLOP forward + backward")
        x = torch.rand(args.batch, 3, *args.size, device=device).to(memory_format=memory) * 255
        for label, space_to_batch in (("space-to-batch fc6", True), ("plain dilated fc6", False)):
            frontend = FrontEnd(19, arch=args.arch, fc6_space_to_batch=space_to_batch)
            frontend = frontend.to(device).to(memory_format=memory).train()
            profile_step(label, frontend, x, autocast, cuda, macs, peak, args.rows)
        return
    (channels, h, w), fc6_macs = fc6_shapes(*args.size)
    macs = 3 * args.batch * fc6_macs  # forward, weight and input gradients
    print(f"device: {name}; fc6 input ({args.batch}, {channels}, {h}, {w}) for a "
          f"{args.size[0]}x{args.size[1]} image; {args.precision}, {layout}; "
          f"{2 * macs / 3e12:.4g} TFLOP forward")
    x = torch.randn(args.batch, channels, h, w, device=device).to(memory_format=memory)
    x.requires_grad_()
    for way, conv_class in WAYS.items():
        conv = conv_class(512, 4096, 7, dilation=4).to(device).to(memory_format=memory)
        profile_step(way, conv, x, autocast, cuda, macs, peak, args.rows)


def profile_step(label: str, module: torch.nn.Module, x: torch.Tensor, autocast, cuda: bool,
                 train_macs: int, peak: float | None, rows: int) -> None:
    """Profile one forward + backward of ``module`` on ``x`` after warm-up, then report it."""
    for _ in range(2 if cuda else 1):  # warm-up
        backward_step(module, x, autocast)
    sync(x.device)
    start = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        backward_step(module, x, autocast)
        sync(x.device)
    wall = time.perf_counter() - start
    report(label, prof, cuda, train_macs, wall, peak, rows)


def report(label: str, prof, cuda: bool, train_macs: int, wall: float, peak: float | None,
           rows: int) -> None:
    events = [e for e in prof.key_averages()
              if (e.device_type.name == "CUDA") == cuda and e.key]
    attr = "device_time_total" if cuda else "self_cpu_time_total"
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    total_us = sum(getattr(e, attr) for e in events) if cuda else wall * 1e6
    achieved = 2 * train_macs / (total_us * 1e-6) / 1e12 if total_us > 0 else math.nan
    mfu = f", MFU {achieved / peak:.1%} of {peak:.0f}" if peak else ""
    print(f"\n== {label}: forward + backward {total_us / 1e3:.2f} ms "
          f"({'GPU kernel time' if cuda else 'CPU wall'}), {achieved:.3g} TFLOP/s{mfu}")
    flagged = 0.0
    print("| kernel | calls | time (ms) | share | class |\n|---|---|---|---|---|")
    for event in events[:rows]:
        t = getattr(event, attr)
        kind = classify_kernel(event.key) if cuda else "-"
        flagged += t if kind == "FLAG" else 0.0
        name = event.key if len(event.key) < 110 else event.key[:107] + "..."
        print(f"| `{name}` | {event.count} | {t / 1e3:.3f} | {t / max(total_us, 1):.0%} "
              f"| {kind} |")
    if cuda:
        verdict = ("all convolution / GEMM time on tensor-core kernels" if flagged == 0 else
                   f"FLAG: {flagged / max(total_us, 1):.0%} of the time in kernels without tensor "
                   "cores (try --precision bf16, channels_last, or the space-to-batch path)")
        print(f"\n{verdict}")
    if not math.isfinite(achieved):
        print("(no kernel time recorded)")


if __name__ == "__main__":
    main()
