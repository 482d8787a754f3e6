"""Analytic multiply-accumulate counts of the networks, from the layer shapes alone.

A MAC is one multiply-add (2 FLOPs). Only convolutions are counted (ReLU, pooling and
normalisation are memory-bound extras, as usual for MFU). Training adds the backward pass:
the weight gradient of every layer costs its forward MACs again, the input gradient too, except
for the first layer (the image needs no gradient). ``benchmarks/`` divides these counts by
measured times to get achieved FLOP/s and model FLOP utilisation (MFU).

    >>> round(frontend_macs("vgg16", 1024, 2048, "same", num_classes=19).total / 1e12, 2)
    4.73
    >>> round(frontend_macs("vgg16", 1024, 2048, "valid", num_classes=19).total / 1e12, 2)
    5.14

The authors' ``valid`` geometry convolves the 186 px reflected margin too: 8.5 % more work
than ``same`` on a Cityscapes image (fc6 alone is 66-71 % of it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dilatedseg.inference import check_deploy_tiles
from dilatedseg.models.context import layer_widths, resolve_dilations
from dilatedseg.models.frontend import (
    ARCHITECTURES,
    OUTPUT_STRIDE,
    context_margin,
    valid_shrinkage,
)

# Dense (no sparsity) peak TFLOP/s per precision of GPUs we know: (name substring, peaks).
# "tf32" is what fp32 convolutions / matmuls reach with cuDNN's TF32 (PyTorch's default for
# convolutions); "fp32" is the non-tensor-core rate.
GPU_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "tf32": 494.0, "fp32": 67.0}),  # SXM (HBM3)
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


@dataclass
class Layer:
    name: str
    macs: int  # forward multiply-accumulates
    out_shape: tuple[int, int, int]  # (channels, height, width) of one image


@dataclass
class Count:
    """Per-layer forward MACs of one image and derived totals."""

    layers: list[Layer] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Forward MACs."""
        return sum(layer.macs for layer in self.layers)

    def training(self, first_layer_input_grad: bool = False) -> int:
        """Forward + backward MACs: weight gradients of all layers, input gradients of all but
        the first (unless its input needs a gradient too)."""
        input_grads = self.total - (0 if first_layer_input_grad or not self.layers
                                    else self.layers[0].macs)
        return 2 * self.total + input_grads

    def __add__(self, other: Count) -> Count:
        return Count(self.layers + other.layers)


def conv_macs(c_in: int, c_out: int, kernel: int, h_out: int, w_out: int,
              groups: int = 1) -> int:
    return c_in // groups * c_out * kernel * kernel * h_out * w_out


def frontend_macs(arch: str, height: int, width: int, padding: str = "valid",
                  num_classes: int = 21, deploy_input: bool = False) -> Count:
    """MACs of :class:`~dilatedseg.models.FrontEnd` on one ``height`` x ``width`` image,
    including the ``valid`` geometry's reflected margin (the work the GPU really does).
    ``deploy_input``: ``height`` x ``width`` is the network's input as it runs, padded already
    (a deploy tile of :func:`~dilatedseg.inference.network_tiled`, e.g. 1396 x 1396)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose one of {list(ARCHITECTURES)}")
    if padding not in ("valid", "same"):
        raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
    if padding == "same" or deploy_input:
        h, w = height, width
    else:  # reflect-pad by the margin, and up to a multiple of 8
        margin = valid_shrinkage(arch)
        h = math.ceil(height / OUTPUT_STRIDE) * OUTPUT_STRIDE + margin
        w = math.ceil(width / OUTPUT_STRIDE) * OUTPUT_STRIDE + margin
    count, channels = Count(), 3
    for spec in ARCHITECTURES[arch]:
        if len(spec) == 1:  # 2x2 stride-2 ceil-mode pool
            h, w = math.ceil(h / 2), math.ceil(w / 2)
            continue
        name, out, kernel, dilation = spec
        if padding == "valid":
            h, w = h - dilation * (kernel - 1), w - dilation * (kernel - 1)
        if h < 1 or w < 1:
            raise ValueError(f"{height}x{width} is too small for {arch} ({name})")
        count.layers.append(Layer(name, conv_macs(channels, out, kernel, h, w), (out, h, w)))
        channels = out
    count.layers.append(Layer("final", conv_macs(channels, num_classes, 1, h, w),
                              (num_classes, h, w)))
    return count


def context_macs(num_classes: int, variant: str = "basic",
                 dilations: str | tuple[int, ...] | list[int] = "dilation8",
                 height: int = 64, width: int = 64, padding: str = "same") -> Count:
    """MACs of :class:`~dilatedseg.models.ContextModule` on one (C, height, width) map.
    ``same`` keeps the size at every layer; ``valid`` pads once by the receptive field's
    radius, and each 3x3 layer then loses 2 x its dilation."""
    schedule = resolve_dilations(dilations)
    count, channels = Count(), num_classes
    if padding == "valid":
        height, width = height + 2 * sum(schedule), width + 2 * sum(schedule)
    widths = layer_widths(num_classes, variant, len(schedule))
    for i, (width_out, dilation) in enumerate(zip(widths, schedule)):
        if padding == "valid":
            height, width = height - 2 * dilation, width - 2 * dilation
        count.layers.append(Layer(f"ctx{i + 1}", conv_macs(channels, width_out, 3, height, width),
                                  (width_out, height, width)))
        channels = width_out
    count.layers.append(Layer("ctx_final", conv_macs(channels, num_classes, 1, height, width),
                              (num_classes, height, width)))
    return count


def tiles(height: int, width: int, tile: tuple[int, int] | None) -> list[tuple[int, int]]:
    """Output sizes of the tiles :func:`dilatedseg.inference.predict_logits` cuts."""
    if tile is None or (height <= tile[0] and width <= tile[1]):
        return [(height, width)]
    out_h, out_w = math.ceil(height / OUTPUT_STRIDE), math.ceil(width / OUTPUT_STRIDE)
    cells_h, cells_w = math.ceil(tile[0] / OUTPUT_STRIDE), math.ceil(tile[1] / OUTPUT_STRIDE)
    return [(OUTPUT_STRIDE * (min(top + cells_h, out_h) - top),
             OUTPUT_STRIDE * (min(left + cells_w, out_w) - left))
            for top in range(0, out_h, cells_h) for left in range(0, out_w, cells_w)]


def head_macs(num_classes: int, cells: tuple[int, int], context_variant: str | None,
              dilations: str | tuple[int, ...] | list[int], context_padding: str,
              upsample: str) -> Count:
    """MACs after the front-end on a ``cells`` (h, w) map: the context module (None: none) and
    the ``deconv`` upsampling (``bilinear`` and ``zoom`` are no convolutions)."""
    h, w = cells
    count = Count()
    if context_variant is not None:
        count = context_macs(num_classes, context_variant, dilations, h, w, context_padding)
    if upsample == "deconv":  # grouped ConvTranspose2d(C, C, 16, 8, 4): 256 taps per input cell
        count.layers.append(Layer("deconv", num_classes * 4 * OUTPUT_STRIDE ** 2 * h * w,
                                  (num_classes, OUTPUT_STRIDE * h, OUTPUT_STRIDE * w)))
    return count


def segmenter_macs(arch: str, height: int, width: int, num_classes: int,
                   context_variant: str | None = "basic",
                   dilations: str | tuple[int, ...] | list[int] = "dilation10",
                   padding: str = "valid", upsample: str = "deconv",
                   tile: tuple[int, int] | None = None, context_padding: str = "same",
                   tile_whole_network: bool = False) -> Count:
    """Inference MACs of a :class:`~dilatedseg.models.Segmenter` (no CRF) on one image, tiled
    as :func:`~dilatedseg.inference.predict_logits` tiles it with ``tile`` and
    ``tile_whole_network``: by default the front-end per tile, the rest once on the stitched
    map; with ``tile_whole_network`` the whole network on ceil(H / tile) x ceil(W / tile)
    full deploy inputs (tile + the front-end's margin on every side)."""
    if tile is not None and tile_whole_network:
        check_deploy_tiles((height, width), tile)
        margin = context_margin(arch, padding)
        one = frontend_macs(arch, tile[0] + 2 * margin, tile[1] + 2 * margin, padding,
                            num_classes, deploy_input=True)
        one = one + head_macs(num_classes, one.layers[-1].out_shape[1:], context_variant,
                              dilations, context_padding, upsample)
        return Count(one.layers * (math.ceil(height / tile[0]) * math.ceil(width / tile[1])))
    count = Count()
    for tile_h, tile_w in tiles(height, width, tile):
        count = count + frontend_macs(arch, tile_h, tile_w, padding, num_classes)
    cells = (math.ceil(height / OUTPUT_STRIDE), math.ceil(width / OUTPUT_STRIDE))
    return count + head_macs(num_classes, cells, context_variant, dilations, context_padding,
                             upsample)


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    """Dense peak TFLOP/s of a known GPU at ``precision`` ("bf16", "tf32", "fp32"), else None."""
    for key, peaks in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(precision)
    return None
