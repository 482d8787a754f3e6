"""Front-end + context module + upsampling (+ CRF) as one module."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from dilatedseg.models.context import SCHEDULES, ContextModule
from dilatedseg.models.frontend import OUTPUT_STRIDE, FrontEnd

IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)
IMAGENET_STD_RGB = (58.395, 57.12, 57.375)


def bilinear_upsampling_kernel(channels: int, factor: int = OUTPUT_STRIDE) -> torch.Tensor:
    """Weights of a grouped ConvTranspose2d(C, C, 2f, f, f/2) doing bilinear x f upsampling."""
    size = 2 * factor
    centre = factor - 0.5
    ramp = 1 - torch.abs(torch.arange(size, dtype=torch.float32) - centre) / factor
    kernel = ramp[:, None] * ramp[None, :]
    return kernel.expand(channels, 1, size, size).clone()


def zoom_log_probabilities(log_probabilities: torch.Tensor, size: tuple[int, int]
                           ) -> torch.Tensor:
    """The log of the authors' ``interp_map`` of the probabilities: feature i on pixel 8i,
    bilinear between features, the edge feature repeated past the last one.

    Computed in log space, one axis at a time (log(a e^x + b e^y) = logaddexp(x + log a,
    y + log b)), so a class far below the winner keeps its exact log-probability and gradient
    instead of underflowing to 0."""
    values = F.pad(log_probabilities, (0, 1, 0, 1), mode="replicate")
    for dim, length in ((2, size[0]), (3, size[1])):
        position = torch.arange(length, device=values.device, dtype=values.dtype)
        position = position / OUTPUT_STRIDE
        first = position.floor()
        fraction = (position - first).view([-1 if d == dim else 1 for d in range(4)])
        first = first.long()
        values = torch.logaddexp(values.index_select(dim, first) + torch.log1p(-fraction),
                                 values.index_select(dim, first + 1) + torch.log(fraction))
    return values


class Segmenter(nn.Module):
    """(B, 3, H, W) image in 0-255 RGB -> (B, C, H, W) logits at input resolution.

    ``context=None`` gives the front-end alone. ``upsample="bilinear"`` interpolates the 1/8
    logits (feature i centred on pixel 8i + 3.5, its receptive field's centre); ``"deconv"`` is
    the frozen grouped bilinear ConvTranspose2d(C, C, 16, 8, 4) of the authors' Cityscapes model
    (same centring, zeros past the border); ``"zoom"`` is the authors' ``interp_map`` for their
    VOC / CamVid / KITTI models: the probabilities interpolated, feature i at pixel 8i (use it
    with their weights, which were trained so); ``"auto"`` picks deconv for the Dilation10 schedule,
    bilinear otherwise.
    ``crf`` refines the upsampled logits with the image.
    """

    def __init__(
        self,
        frontend: FrontEnd,
        context: ContextModule | None = None,
        crf: nn.Module | None = None,
        upsample: str = "bilinear",
        pixel_mean: tuple[float, float, float] = IMAGENET_MEAN_RGB,
        pixel_std: tuple[float, float, float] = IMAGENET_STD_RGB,
    ):
        super().__init__()
        self.frontend, self.context, self.crf = frontend, context, crf
        if upsample not in ("bilinear", "deconv", "zoom", "auto"):
            raise ValueError("upsample must be 'bilinear', 'deconv', 'zoom' or 'auto', got "
                             f"{upsample!r}")
        if upsample == "auto":
            dilation10 = context is not None and context.dilations == SCHEDULES["dilation10"]
            upsample = "deconv" if dilation10 else "bilinear"
        self.upsample = upsample
        num_classes = frontend.final.out_channels
        if upsample == "deconv":  # a constant: not saved, so checkpoints load either way
            self.register_buffer("deconv_weight", bilinear_upsampling_kernel(num_classes),
                                 persistent=False)
        if len(pixel_std) != 3 or min(pixel_std) <= 0 or len(pixel_mean) != 3:
            raise ValueError(f"pixel_mean and pixel_std take 3 values (R, G, B), the std's "
                             f"positive; got {list(pixel_mean)} and {list(pixel_std)}")
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1))

    def normalise(self, image: torch.Tensor) -> torch.Tensor:
        """0-255 RGB (uint8 or float) -> the front-end's normalised float input."""
        return (image - self.pixel_mean) / self.pixel_std

    def frontend_logits(self, image: torch.Tensor, context_included: bool = False
                        ) -> torch.Tensor:
        """Front-end logits at 1/8 resolution (what the feature cache stores)."""
        return self.frontend(self.normalise(image), context_included)

    def coarse_logits(self, image: torch.Tensor) -> torch.Tensor:
        """Front-end (+ context) logits at 1/8 resolution."""
        return self.refine(self.frontend_logits(image))

    def refine(self, frontend_logits: torch.Tensor) -> torch.Tensor:
        """Apply the context module (if any) to front-end logits."""
        return frontend_logits if self.context is None else self.context(frontend_logits)

    def upsample_to(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """1/8-resolution logits -> logits at ``size``.

        ``zoom`` is the authors' ``interp_map``, which their test code applies to the softmax:
        it interpolates the probabilities and returns their log (a logit whose softmax is
        them, so argmax, CRF unary and loss all see the interpolated probabilities).
        ``bilinear`` and ``deconv`` interpolate the logits, in training and evaluation alike
        (the authors' Cityscapes deconvolution also comes before the softmax).
        All three run in float32 under any autocast: bf16 full-resolution logits would tie
        classes (and so change the argmax) on ~0.5% of pixels.
        """
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        if self.upsample == "deconv":
            device = logits.device.type
            # (the meta device used for FLOP counting has no autocast to turn off)
            no_autocast = (torch.autocast(device, enabled=False)
                           if torch.amp.is_autocast_available(device) else contextlib.nullcontext())
            with no_autocast:
                logits = F.conv_transpose2d(
                    logits, self.deconv_weight.to(logits.dtype), stride=OUTPUT_STRIDE,
                    padding=OUTPUT_STRIDE // 2, groups=logits.shape[1],
                )
            return logits[..., : size[0], : size[1]]
        if self.upsample == "zoom":
            return zoom_log_probabilities(F.log_softmax(logits, dim=1), size)
        return F.interpolate(logits, scale_factor=OUTPUT_STRIDE, mode="bilinear",
                             align_corners=False)[..., : size[0], : size[1]]

    def forward(self, image: torch.Tensor, use_crf: bool = True,
                context_included: bool = False) -> torch.Tensor:
        """``context_included``: the image carries the front-end's margin of context on every
        side (training crops, see :meth:`FrontEnd.forward`); the logits cover its centre."""
        logits = self.frontend_logits(image, context_included)
        if context_included:
            m = self.frontend.margin
            image = image[..., m: image.shape[-2] - m, m: image.shape[-1] - m]
        return self.from_frontend_logits(logits, image.shape[-2:], image if use_crf else None,
                                         use_crf=use_crf)

    def from_frontend_logits(self, frontend_logits: torch.Tensor, size: tuple[int, int],
                             image: torch.Tensor | None = None,
                             use_crf: bool = True) -> torch.Tensor:
        """The rest of the network after the front-end: context, upsampling to ``size``, CRF
        (which needs the 0-255 RGB ``image``)."""
        logits = self.upsample_to(self.refine(frontend_logits), size)
        if self.crf is not None and use_crf:
            if image is None:
                raise ValueError("the CRF needs the image: train it on images, not on cached "
                                 "front-end logits (--model.feature_cache=false)")
            logits = self.crf(logits, image)
        return logits
