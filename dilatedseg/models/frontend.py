"""The dilated VGG-16 front-end of Yu & Koltun (2016), and a small CPU variant of it.

VGG-16 with pool4 and pool5 removed, conv5 dilated by 2 and fc6 (7x7) dilated by 4, so the
logits come out at stride 8. With ``padding="valid"`` (the authors' geometry) the input is
reflect-padded by half the network's shrinkage (186 px for VGG-16) and every convolution is
unpadded; with ``padding="same"`` every convolution is zero-padded instead.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

# (name, out_channels, kernel, dilation); "pool" entries are 2x2 stride-2 ceil-mode max pools.
ARCHITECTURES: dict[str, list[tuple]] = {
    "vgg16": [
        ("conv1_1", 64, 3, 1), ("conv1_2", 64, 3, 1), ("pool1",),
        ("conv2_1", 128, 3, 1), ("conv2_2", 128, 3, 1), ("pool2",),
        ("conv3_1", 256, 3, 1), ("conv3_2", 256, 3, 1), ("conv3_3", 256, 3, 1), ("pool3",),
        ("conv4_1", 512, 3, 1), ("conv4_2", 512, 3, 1), ("conv4_3", 512, 3, 1),
        ("conv5_1", 512, 3, 2), ("conv5_2", 512, 3, 2), ("conv5_3", 512, 3, 2),
        ("fc6", 4096, 7, 4), ("fc7", 4096, 1, 1),
    ],
    # Same topology (3 pools, dilated conv5, fc6/fc7 as convolutions), far fewer channels and
    # layers: a ~54 px receptive field, which leaves long-range context to the context module.
    "tiny": [
        ("conv1_1", 16, 3, 1), ("pool1",),
        ("conv2_1", 32, 3, 1), ("pool2",),
        ("conv3_1", 64, 3, 1), ("pool3",),
        ("conv5_1", 64, 3, 2),
        ("fc6", 128, 1, 1), ("fc7", 128, 1, 1),
    ],
}

OUTPUT_STRIDE = 8


def receptive_field(arch: str) -> int:
    """Receptive field in input pixels of one output logit."""
    field, stride = 1, 1
    for layer in ARCHITECTURES[arch]:
        if len(layer) == 1:
            field += stride
            stride *= 2
        else:
            _, _, kernel, dilation = layer
            field += (kernel - 1) * dilation * stride
    return field


def context_margin(arch: str, padding: str) -> int:
    """The px of image context a front-end reads past its output on every side: half the
    valid-geometry shrinkage (186 for VGG-16), 0 with ``padding="same"``."""
    return valid_shrinkage(arch) // 2 if padding == "valid" else 0


def check_context_margin(margin: int, arch: str, padding: str) -> None:
    """Training crops that carry ``margin`` px of context on every side need a front-end that
    takes exactly that margin (0: crops without context, padded by the front-end)."""
    expected = context_margin(arch, padding)
    if margin not in (0, expected):
        raise ValueError(
            f"the training crops carry {margin} px of context on every side, but this "
            f"front-end (arch={arch}, padding={padding}) takes {expected}: set "
            f"--data.init_args.context_margin={expected}")


def valid_shrinkage(arch: str) -> int:
    """Pixels an input loses through the unpadded convolutions (372 for VGG-16)."""
    return receptive_field(arch) - (OUTPUT_STRIDE - 1) - 1


class FrontEnd(nn.Module):
    """Dilated VGG-16 front-end: (B, 3, H, W) normalised image -> (B, C, H/8, W/8) logits.

    ``padding="valid"`` is the authors' geometry: the image is reflect-padded (REFLECT_101) by
    half the shrinkage (186 px for VGG-16), plus up to 7 px more at the bottom / right so the
    size is a multiple of 8, and runs through unpadded convolutions and ceil-mode pools. Any
    H x W gives ceil(H/8) x ceil(W/8) logits, logit (i, j) centred on input pixel
    (8i + 3.5, 8j + 3.5): the same alignment as ``padding="same"`` and as bilinear x8
    upsampling with ``align_corners=False``. ``features`` + ``final`` alone are the bare
    network: 900 x 900 in, 66 x 66 out. ``pretrained``: ImageNet VGG-16 weights (a path, a URL
    or "imagenet", see :mod:`dilatedseg.models.weights`). ``fc6_space_to_batch``: run the
    dilated fc6 as a plain 7x7 convolution over the 4 x 4 interleaved sub-grids of its input
    (:class:`SpaceToBatchConv2d`; same weights, same result): True always, False never, None
    (default) where it helps: always on CUDA, and on the CPU whenever a backward pass follows
    (``benchmarks/conv_variants.py``, ``benchmarks/profile_fc6.py``).
    """

    def __init__(
        self,
        num_classes: int,
        arch: str = "vgg16",
        padding: str = "valid",
        dropout: float = 0.5,
        pretrained: str | None = None,
        fc6_space_to_batch: bool | None = None,
    ):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"FrontEnd: unknown arch {arch!r}; choose one of {list(ARCHITECTURES)}")
        if padding not in ("valid", "same"):
            raise ValueError(f"FrontEnd: padding must be 'valid' or 'same', got {padding!r}")
        self.arch, self.padding = arch, padding
        self.margin = context_margin(arch, padding)
        layers: list[tuple[str, nn.Module]] = []
        channels = 3
        for spec in ARCHITECTURES[arch]:
            if len(spec) == 1:
                layers.append((spec[0], nn.MaxPool2d(2, 2, ceil_mode=True)))
                continue
            name, out, kernel, dilation = spec
            pad = 0 if padding == "valid" else dilation * (kernel - 1) // 2
            if name == "fc6" and dilation > 1:
                conv = SpaceToBatchConv2d(channels, out, kernel, padding=pad, dilation=dilation,
                                          enabled=fc6_space_to_batch)
            else:
                conv = nn.Conv2d(channels, out, kernel, padding=pad, dilation=dilation)
            layers.append((name, conv))
            layers.append((f"{name}_relu", nn.ReLU(inplace=True)))
            if name.startswith("fc") and dropout > 0:
                layers.append((f"{name}_drop", nn.Dropout(dropout)))
            channels = out
        self.features = nn.Sequential(OrderedDict(layers))
        for module in self.features.modules():  # He init; ImageNet weights replace it
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)
        self.final = nn.Conv2d(channels, num_classes, 1)  # no ReLU after the classifier
        nn.init.normal_(self.final.weight, std=1e-3)
        nn.init.zeros_(self.final.bias)
        if pretrained:
            from dilatedseg.models.weights import load_vgg16_imagenet

            load_vgg16_imagenet(self, pretrained)

    def forward(self, image: torch.Tensor, context_included: bool = False) -> torch.Tensor:
        """``context_included``: the image already carries ``margin`` px of context on every
        side (the authors' training crops: 628 x 628 around a 256 x 256 labelled centre, see
        :func:`dilatedseg.data.transforms.train_transform`), so it is not padded again and the
        logits cover its centre, H - 2 margin x W - 2 margin."""
        return self.final(self.features(self.pad_input(image, context_included)))

    def pad_input(self, image: torch.Tensor, context_included: bool = False) -> torch.Tensor:
        """In ``valid`` geometry: reflect-pad the margin (unless ``context_included``) and the
        bottom / right up to a multiple of 8, so the output is exactly ceil(H/8) x ceil(W/8) and
        stays aligned. ``same``: the image as it is."""
        if context_included and not self.margin:
            raise ValueError("padding='same' takes images without a context margin")
        if not self.margin:
            return image
        m = 0 if context_included else self.margin
        height, width = (size - 2 * (self.margin - m) for size in image.shape[-2:])
        extra_h = math.ceil(height / OUTPUT_STRIDE) * OUTPUT_STRIDE - height
        extra_w = math.ceil(width / OUTPUT_STRIDE) * OUTPUT_STRIDE - width
        if m or extra_h or extra_w:
            image = reflect_pad(image, (m, m + extra_w, m, m + extra_h))
        return image


class SpaceToBatchConv2d(nn.Conv2d):
    """A dilated convolution computed as an undilated one on a rearranged tensor.

    With dilation d, output pixel (d p + a, d q + b) only reads input pixels of the same
    residue (a, b) mod d, so the input is split into its d x d interleaved sub-grids, stacked
    along the batch, convolved with the undilated kernel and interleaved back. The weights,
    state dict and result are those of ``nn.Conv2d`` (up to float rounding order).

    ``enabled``: True always, False never (the library's dilated kernel), None (default) where
    it pays: on CUDA always, on other devices whenever gradients will flow. On the CPU
    PyTorch's backward of a dilated convolution (``slow_conv_dilated2d``) takes ~300 s for
    VGG-16's fc6 on a 50 x 50 input on 2 cores, this path ~5 s, while for inference oneDNN's
    dilated kernel is ~1.3x faster than this path. On an H200 (cuDNN 9.19, bf16) fc6's forward
    + backward for a 512x1024 crop pair took 141 ms as cuDNN's dilated kernels (72 TFLOP/s) and
    26.5 ms this way (381 TFLOP/s); the forward alone is not measured yet, and this path costs
    at most two copies of fc6's input and output (memory-bound, ~1% of the convolution), so
    CUDA inference takes it too (``enabled=False`` forces cuDNN's kernel).

    The rearranged batch is convolved in chunks of at most ``max_sub_batch`` images: on the H200
    a whole VGG-16 training step at 512x1024 ran at 370-392 TFLOP/s with 32 or 64 sub-images
    per call (batch 2 or 4) and at 129 with 128 (batch 8, one call), cuDNN choosing a slower
    kernel for the larger batch.
    """

    max_sub_batch = 64

    def __init__(self, *args, enabled: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.enabled = enabled

    def use_space_to_batch(self, x: torch.Tensor) -> bool:
        if self.enabled is not None:
            return self.enabled
        if x.is_cuda:
            return True
        wants_grad = x.requires_grad or self.weight.requires_grad
        return torch.is_grad_enabled() and wants_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dilation
        if self.groups != 1 or self.stride != (1, 1) or d == (1, 1) or \
                self.padding_mode != "zeros" or isinstance(self.padding, str) or \
                not self.use_space_to_batch(x):
            return super().forward(x)
        (kh, kw), (dh, dw), (ph, pw) = self.kernel_size, d, self.padding
        batch, channels, height, width = x.shape
        height, width = height + 2 * ph, width + 2 * pw
        out_h, out_w = height - dh * (kh - 1), width - dw * (kw - 1)
        if out_h < 1 or out_w < 1:  # too small: let the plain convolution raise its error
            return super().forward(x)
        sub_h, sub_w = math.ceil(height / dh), math.ceil(width / dw)
        # One pad: the convolution's own, plus up to a multiple of the dilation (fc6 in valid
        # geometry with suitable sizes needs none: no copy then).
        pads = (pw, pw + sub_w * dw - width, ph, ph + sub_h * dh - height)
        if any(pads):
            x = F.pad(x, pads)
        # Rearranged in the input's layout, so channels_last (CUDA's fast path) stays
        # channels_last through the convolution and out, one copy each way.
        nhwc = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        if nhwc:
            x = x.permute(0, 2, 3, 1).reshape(batch, sub_h, dh, sub_w, dw, channels)
            x = x.permute(2, 4, 0, 1, 3, 5).reshape(dh * dw * batch, sub_h, sub_w, channels)
            x = x.permute(0, 3, 1, 2)
        else:
            x = x.reshape(batch, channels, sub_h, dh, sub_w, dw).permute(3, 5, 0, 1, 2, 4)
            x = x.reshape(dh * dw * batch, channels, sub_h, sub_w)
        # (dh dw B, O, sub_h - kh + 1, sub_w - kw + 1), in chunks of the batch (see above)
        chunks = [F.conv2d(chunk, self.weight, self.bias) for chunk in x.split(self.max_sub_batch)]
        y = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        rows, cols = sub_h - kh + 1, sub_w - kw + 1
        if nhwc:
            y = y.permute(0, 2, 3, 1).reshape(dh, dw, batch, rows, cols, -1)
            y = y.permute(2, 3, 0, 4, 1, 5).reshape(batch, rows * dh, cols * dw, -1)
            y = y.permute(0, 3, 1, 2)
        else:
            y = y.reshape(dh, dw, batch, -1, rows, cols).permute(2, 3, 4, 0, 5, 1)
            y = y.reshape(batch, -1, rows * dh, cols * dw)
        return y[..., :out_h, :out_w]


def reflect_index(size: int, before: int, after: int) -> torch.Tensor:
    """Source indices of a REFLECT_101 pad (edge not repeated), for pads of any length."""
    index = torch.arange(-before, size + after)
    if size == 1:
        return torch.zeros_like(index)
    period = 2 * (size - 1)
    index = index.remainder(period)
    return torch.where(index >= size, period - index, index)


def reflect_pad(image: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """Reflect padding (left, right, top, bottom) as OpenCV's BORDER_REFLECT_101 and numpy's
    'reflect', also when a pad exceeds the image size (the reflection then repeats)."""
    left, right, top, bottom = pad
    height, width = image.shape[-2:]
    if max(left, right) < width and max(top, bottom) < height:
        return F.pad(image, pad, mode="reflect")
    rows = reflect_index(height, top, bottom).to(image.device)
    cols = reflect_index(width, left, right).to(image.device)
    return image.index_select(-2, rows).index_select(-1, cols)
