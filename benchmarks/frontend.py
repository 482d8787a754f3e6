"""Front-end (dilated VGG-16) forward / forward+backward, and whole-Segmenter inference on a
Cityscapes image (tiled as the paper), with achieved FLOP/s and MFU.

    python3 benchmarks/frontend.py [--quick]      # or through benchmarks/run.py

GPU: batch 8 at 512x512 and 512x1024 (the training-crop target: >= 40 % MFU in bf16), batch 1-2
at 1024x2048; fp32 (TF32) in NCHW as the baseline and the fast path (bf16 autocast, channels
last, space-to-batch fc6 in training), and the bf16 target once more with cuDNN's dilated fc6.
CPU: batch 1, one or two repetitions; the 1024x2048 rows take about a minute each on 2 cores
and are skipped by ``--quick``. fwd+bwd backpropagates a mean-square
loss of the logits (the loss itself costs nothing next to the network): the network alone.

``training step`` (GPU, next to the 512x1024 fwd+bwd row): a whole step of the framework's
front-end stage, outside Lightning's Trainer but as it runs one (:func:`train_step_row`): the
Cityscapes recipe's :class:`~dilatedseg.module.SegmentationModule` (VGG-16 valid, 19 classes,
dropout 0.5, deconvolution upsampling, channels_last, space-to-batch fc6, SGD with momentum and
weight decay from its ``configure_optimizers``) on a batch of uint8 image crops carrying the
186 px context margin, 884x1396 around 512x1024 uint8 labels, copied from pinned memory to the
GPU, then ``training_step`` under bf16 autocast (forward, x8 deconvolution to full resolution,
float32 cross-entropy), backward, ``optimizer.step()`` and ``zero_grad``. On the CPU the same
code runs once with the tiny front-end on small crops, as a check of the path only.

Times are the best of N calls, with the median in the note (``common.timed``); MFU is of the
best call, the note also gives the median call's.
"""

from __future__ import annotations

import contextlib
import functools
import traceback
import warnings

import torch
from common import (
    Row,
    add_row,
    backward_step,
    compute_row,
    device_label,
    not_measured,
    peak_tflops,
    recipe_model_args,
    script_main,
    timed,
)

from dilatedseg.flops import frontend_macs, segmenter_macs
from dilatedseg.inference import predict_logits
from dilatedseg.models import ContextModule, FrontEnd, Segmenter
from dilatedseg.module import SegmentationModule

CLASSES = 19  # Cityscapes
TILE = (1024, 1024)
INFERENCE_TARGET_MS = 25.0
TRAIN_MFU_TARGET = 0.40


def precision_context(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare(module: torch.nn.Module, device: torch.device, precision: str):
    module = module.to(device)
    if device.type == "cuda" and precision == "bf16":  # the fast path: NHWC tensor cores
        module = module.to(memory_format=torch.channels_last)
    return module


def image_batch(batch: int, size: tuple[int, int], device: torch.device, precision: str):
    image = torch.rand(batch, 3, *size, device=device) * 255
    if device.type == "cuda" and precision == "bf16":
        image = image.contiguous(memory_format=torch.channels_last)
    return image


def frontend_row(device, precision, mode, size, batch, reps, peak, space_to_batch=None,
                 arch="vgg16") -> Row:
    torch.manual_seed(0)
    frontend = prepare(FrontEnd(CLASSES, arch=arch, fc6_space_to_batch=space_to_batch),
                       device, precision)
    image = image_batch(batch, size, device, precision)
    autocast = precision_context(device, precision)
    macs = frontend_macs(arch, *size, "valid", CLASSES)

    if mode == "forward":
        frontend.eval()

        def step():
            with torch.inference_mode(), autocast:
                frontend(image)
        work = macs.total
    else:
        frontend.train()

        def step():
            backward_step(frontend, image, autocast)
        work = macs.training()
    if device.type == "cpu":  # warm up on a small image: a full-size warm-up costs a minute
        small = image[..., :64, :64]
        with torch.inference_mode():
            frontend.eval()(small)
        frontend.train(mode != "forward")
        seconds = timed(step, device, reps, warmup=0)
    else:
        seconds = timed(step, device, reps, warmup=3)
    case = f"{mode} {size[0]}x{size[1]}" + ("" if arch == "vgg16" else f", {arch} front-end")
    if space_to_batch is False:
        case += ", fc6 as cuDNN's dilated convolution"
    elif mode != "forward" or device.type == "cuda":
        case += " (fc6 space-to-batch: the default here)"
    note = "channels_last" if device.type == "cuda" and precision == "bf16" else ""
    if mode != "forward" and arch == "vgg16" and size == (512, 1024) and precision == "bf16":
        note += f"; target >= {TRAIN_MFU_TARGET:.0%} MFU"
    return compute_row("front-end", case, device, precision, batch, seconds, work, peak,
                       note.strip("; "))


def train_step_row(device, precision, size, batch, reps, peak, arch="vgg16") -> Row:
    """One whole training step of the front-end stage as the framework runs it (see the module
    docstring), outside Lightning's Trainer: the batch's host-to-device copy, the module's own
    ``training_step`` (its ``self.log`` is a no-op without a Trainer), backward, SGD step and
    ``zero_grad``. ``size`` is the labelled crop; the image crop adds the context margin on
    every side (884x1396 for 512x1024 labels with VGG-16).

    FLOPs: the front-end's analytic forward + backward on the image crop with its margin,
    ``frontend_macs(arch, *size, "valid")`` (which adds the margin to the labelled size), the
    same count as the mean-square fwd+bwd row's, whose 512x1024 images the front-end
    reflect-pads to the same 884x1396; the deconvolution (0.002 % of it), the loss and the
    optimiser are not counted, so their time lowers the MFU.
    """
    torch.manual_seed(0)
    # The Cityscapes front-end recipe, without pretrained weights (the same work).
    # channels_last applies on CUDA only, as in apply_fast_path.
    module = SegmentationModule(CLASSES, **recipe_model_args(
        "cityscapes", "frontend", arch=arch, channels_last=True, fc6_space_to_batch=None))
    module.to(device)
    module.apply_fast_path(device)  # what setup() does: channels_last weights on CUDA
    module.train()
    optimizer = module.configure_optimizers()  # constant schedule: the SGD optimiser alone
    margin = module.model.frontend.margin
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (batch, 3, size[0] + 2 * margin, size[1] + 2 * margin),
                          generator=generator, dtype=torch.uint8)
    label = torch.randint(0, CLASSES, (batch, *size), generator=generator, dtype=torch.uint8)
    label[:, :, : size[1] // 10] = 255  # some ignored pixels, as real labels have
    if device.type == "cuda":  # the loaders' pin_memory
        image, label = image.pin_memory(), label.pin_memory()
    autocast = precision_context(device, precision)

    def step():
        batch_on_device = {"image": image.to(device, non_blocking=True),
                           "label": label.to(device, non_blocking=True)}
        with autocast:
            loss = module.training_step(batch_on_device, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*self.log.*")
        seconds = timed(step, device, reps, warmup=0 if device.type == "cpu" else 3)
    work = frontend_macs(arch, *size, "valid", CLASSES).training()
    case = (f"training step {size[0]}x{size[1]} labels, "
            f"{size[0] + 2 * margin}x{size[1] + 2 * margin} image crops"
            + ("" if arch == "vgg16" else f", {arch} front-end"))
    note = ("SegmentationModule.training_step (deconv x8, float32 cross-entropy on uint8 "
            "labels) + backward + SGD step + zero_grad; no Trainer")
    if device.type == "cuda":
        note += "; batch copied from pinned memory"
    if device.type == "cuda" and precision == "bf16":
        note += "; channels_last"
    if arch == "vgg16" and size == (512, 1024) and precision == "bf16":
        note += f"; target >= {TRAIN_MFU_TARGET:.0%} MFU"
    if device.type == "cpu":
        note += "; CPU: a check of the code path, not a figure"
    return compute_row("front-end", case, device, precision, batch, seconds, work, peak, note)


def segmenter_row(device, precision, reps, peak, tile=TILE, space_to_batch=None,
                  arch="vgg16", size=(1024, 2048)) -> Row:
    """Inference on one Cityscapes-sized image (``size``), in ``tile``s (None: whole)."""
    torch.manual_seed(0)
    segmenter = Segmenter(FrontEnd(CLASSES, arch=arch, fc6_space_to_batch=space_to_batch),
                          ContextModule(CLASSES, dilations="dilation10"), upsample="deconv")
    segmenter = prepare(segmenter, device, precision).eval()
    image = image_batch(1, size, device, precision)
    autocast = precision_context(device, precision)

    def step():
        with torch.inference_mode(), autocast:
            predict_logits(segmenter, image, tile).argmax(1)

    seconds = timed(step, device, reps, warmup=0 if device.type == "cpu" else 3)
    macs = segmenter_macs(arch, *size, CLASSES, tile=tile).total
    case = (f"Cityscapes {size[0]}x{size[1]}, "
            + (f"{tile[0]}x{tile[1]} tiles" if tile else "whole")
            + ("" if arch == "vgg16" else f", {arch} front-end"))
    if space_to_batch is False:
        case += ", fc6 as the library's dilated kernel"
    note = "Dilation10 context + deconv + argmax"
    if device.type == "cuda" and precision == "bf16" and arch == "vgg16":
        note += f"; target <= {INFERENCE_TARGET_MS:.0f} ms"
    return compute_row("Segmenter inference", case, device, precision, 1, seconds, macs, peak,
                       note)


def gpu_plan(bf16: float | None, fp32: float | None) -> list[functools.partial]:
    """The GPU rows in the order they run, each a call that still needs ``device`` and ``reps``
    (every other argument by keyword, so that the tests can make each one on the CPU at a tiny
    size). The targets first (bf16 training at 512x1024, bf16 inference), then the rest, the
    fp32 (TF32) baseline, and last cuDNN's dilated fc6 in training (on the H200 a batch of 8
    did not finish 6 steps in ~2 minutes). ``bf16`` / ``fp32``: the peaks MFU is taken of."""
    row, step, infer = frontend_row, train_step_row, segmenter_row
    target = dict(mode="fwd+bwd", size=(512, 1024), batch=8)
    plan = [functools.partial(row, precision="bf16", peak=bf16, **target),
            functools.partial(step, precision="bf16", size=(512, 1024), batch=8, peak=bf16),
            functools.partial(infer, precision="bf16", peak=bf16),
            functools.partial(infer, precision="bf16", peak=bf16, space_to_batch=False),
            functools.partial(infer, precision="bf16", peak=bf16, tile=None)]
    for precision, peak in (("bf16", bf16), ("fp32", fp32)):
        if precision == "fp32":
            plan += [functools.partial(row, precision=precision, peak=peak, **target),
                     functools.partial(infer, precision=precision, peak=peak)]
        for mode, size, batch in (("forward", (512, 512), 8), ("forward", (1024, 2048), 1),
                                  ("fwd+bwd", (512, 512), 8), ("fwd+bwd", (1024, 2048), 2)):
            plan.append(functools.partial(row, precision=precision, mode=mode, size=size,
                                          batch=batch, peak=peak))
    plan.append(functools.partial(row, precision="bf16", peak=bf16, space_to_batch=False,
                                  **{**target, "batch": 2}))
    return plan


def measure_plan(plan: list[functools.partial], device: torch.device, reps: int) -> list[Row]:
    """Each call of ``plan`` on ``device`` with ``reps`` timed calls, each row printed as it is
    measured; a call that fails gives a row saying so, and the next one runs."""
    rows: list[Row] = []
    for call in plan:
        try:
            add_row(rows, call(device=device, reps=reps))
        except Exception as error:  # noqa: BLE001 - one failing row must not end the rest
            traceback.print_exc()
            add_row(rows, Row("front-end", f"failed: {call.func.__name__}, {call.keywords}",
                              device_label(device),
                              note=f"{type(error).__name__}: {error}"[:200]))
            torch.cuda.empty_cache()  # (an out-of-memory error leaves its blocks cached)
    return rows


def run(device: torch.device, quick: bool = False, peak: float | None = None) -> list[Row]:
    if device.type == "cuda":
        bf16, fp32 = peak_tflops(device, "bf16", peak), peak_tflops(device, "fp32", peak)
        return measure_plan(gpu_plan(bf16, fp32), device, 5 if quick else 10)
    rows: list[Row] = []

    p = peak_tflops(device, "fp32", peak)
    rows.append(frontend_row(device, "fp32", "forward", (512, 512), 1, 1 if quick else 2, p))
    rows.append(frontend_row(device, "fp32", "fwd+bwd", (512, 512), 1, 1, p))
    if quick:
        skipped = "skipped by --quick on CPU (about a minute per image on 2 cores)"
        rows.append(Row("front-end", "forward 1024x2048", rows[0].device, batch=1,
                        tflop=2 * frontend_macs("vgg16", 1024, 2048).total / 1e12,
                        note=skipped))
        rows.append(Row("Segmenter inference", "Cityscapes 1024x2048, 1024x1024 tiles",
                        rows[0].device, batch=1, note=skipped))
    else:
        rows.append(frontend_row(device, "fp32", "forward", (1024, 2048), 1, 1, p))
        rows.append(segmenter_row(device, "fp32", 1, p))
    rows.append(Row("front-end", "fwd+bwd 1024x2048", rows[0].device, batch=1,
                    tflop=2 * frontend_macs("vgg16", 1024, 2048).training() / 1e12,
                    note="skipped on CPU (minutes per image): run on a GPU"))
    # The GPU targets, with the work they imply.
    train = frontend_macs("vgg16", 512, 1024, "valid", CLASSES).training()
    rows.append(not_measured("front-end", "fwd+bwd 512x1024", "bf16", 8, train,
                             f"target >= {TRAIN_MFU_TARGET:.0%} MFU"))
    rows.append(not_measured("front-end", "training step 512x1024 labels, 884x1396 image "
                             "crops", "bf16", 8, train, "the whole step (see the module "
                             f"docstring); target >= {TRAIN_MFU_TARGET:.0%} MFU"))
    # The whole step's code path, cheaply: tiny front-end, 64x128 labels in 110x174 crops.
    rows.append(train_step_row(device, "fp32", (64, 128), 2, 1, p, arch="tiny"))
    infer = segmenter_macs("vgg16", 1024, 2048, CLASSES, tile=TILE).total
    rows.append(not_measured("Segmenter inference", "Cityscapes 1024x2048, 1024x1024 tiles",
                             "bf16", 1, infer, f"target <= {INFERENCE_TARGET_MS:.0f} ms"))
    return rows


if __name__ == "__main__":
    script_main(run, __doc__)
