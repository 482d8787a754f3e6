"""The context module (paper Table 1): dilated 3x3 convolutions over the C class maps.

Each 3x3 layer is followed by a ReLU; a final 1x1 layer (no ReLU) maps back to C channels.
``basic`` keeps C channels throughout (64 C^2 weights for the paper's 7 layers); ``large``
widens them to 2C, 2C, 4C, ..., 32C. Identity initialisation (paper eqs. 4 and 5) makes the
untrained module pass its (non-negative) input through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

# Published schedules: dilations of the 3x3 layers (the final 1x1 layer is always added).
SCHEDULES: dict[str, tuple[int, ...]] = {
    "dilation7": (1, 1, 2, 4, 8, 1),  # KITTI
    "dilation8": (1, 1, 2, 4, 8, 16, 1),  # CamVid, VOC (Table 1)
    "dilation10": (1, 1, 2, 4, 8, 16, 32, 64, 1),  # Cityscapes
}
DEFAULT_DILATIONS = SCHEDULES["dilation8"]
MAX_WIDTH = 32  # the large module's widest layer, in multiples of C


def resolve_dilations(dilations: str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """A preset name ("dilation8") or an explicit list of dilations -> tuple of ints."""
    if isinstance(dilations, str):
        key = dilations.lower()
        if key not in SCHEDULES:
            raise ValueError(
                f"unknown dilation schedule {dilations!r}: use one of {sorted(SCHEDULES)} "
                "or a list of positive integers such as [1, 1, 2, 4, 8, 16, 1]"
            )
        return SCHEDULES[key]
    schedule = tuple(int(d) for d in dilations)
    if not schedule or any(d < 1 for d in schedule):
        raise ValueError(
            f"dilations must be a non-empty list of positive integers, got {dilations}")
    return schedule


def layer_widths(num_classes: int, variant: str, depth: int) -> list[int]:
    """Channels after each 3x3 layer: all C (basic) or 2C, 2C, 4C, ... capped at 32C (large)."""
    if variant == "basic":
        return [num_classes] * depth
    if variant == "large":
        mults = [min(2 ** max(i, 1), MAX_WIDTH) for i in range(depth)]
        if depth > 1:
            mults[-1] = mults[-2]  # the last 3x3 layer keeps its input width (32C, 32C in Table 1)
        return [m * num_classes for m in mults]
    raise ValueError(f"context variant must be 'basic' or 'large', got {variant!r}")


def receptive_field(dilations: tuple[int, ...]) -> int:
    """Receptive field (in feature-map cells) of the module with these 3x3 dilations."""
    return 1 + 2 * sum(dilations)


class ContextModule(nn.Module):
    """(B, C, h, w) logits -> (B, C, h, w) refined logits.

    padding="same": zero-pad every layer by its dilation (the urban models).
    padding="valid": one zero pad of (receptive field - 1) / 2 before the first layer, unpadded
    convolutions after it (the published VOC model). Both keep the spatial size.
    """

    def __init__(
        self,
        num_classes: int,
        variant: str = "basic",
        dilations: str | tuple[int, ...] | list[int] = DEFAULT_DILATIONS,
        init: str = "identity",
        padding: str = "same",
        noise_std: float = 0.01,
    ):
        super().__init__()
        if padding not in ("same", "valid"):
            raise ValueError(f"context padding must be 'same' or 'valid', got {padding!r}")
        if init not in ("identity", "random"):
            raise ValueError(f"context init must be 'identity' or 'random', got {init!r}")
        self.num_classes, self.variant, self.padding = num_classes, variant, padding
        self.dilations = resolve_dilations(dilations)
        self.margin = (receptive_field(self.dilations) - 1) // 2 if padding == "valid" else 0
        widths = layer_widths(num_classes, variant, len(self.dilations))
        layers: list[nn.Module] = []
        channels = num_classes
        for dilation, width in zip(self.dilations, widths):
            pad = dilation if padding == "same" else 0
            layers += [nn.Conv2d(channels, width, 3, padding=pad, dilation=dilation),
                       nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.Conv2d(channels, num_classes, 1))
        self.layers = nn.Sequential(*layers)
        for conv in self.convs():
            if init == "identity":
                identity_init_(conv, num_classes, noise_std)
            else:
                nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
                nn.init.zeros_(conv.bias)

    def convs(self) -> list[nn.Conv2d]:
        return [m for m in self.layers if isinstance(m, nn.Conv2d)]

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.margin:
            logits = nn.functional.pad(logits, (self.margin,) * 4)
        return self.layers(logits)


@torch.no_grad()
def identity_init_(conv: nn.Conv2d, num_classes: int, noise_std: float = 0.01) -> None:
    """Paper eq. 5 (eq. 4 when in = out = C): centre tap C / c_out between channels a, b with
    floor(a C / c_in) == floor(b C / c_out); elsewhere N(0, (noise_std C / c_out)^2); bias 0.

    For the basic module the noise is the authors' N(0, 0.01^2); the large module's scales with
    C / c_out (sigma << C / c_out), else the noise summed over 32C x 9 inputs would swamp the
    identity signal."""
    c_out, c_in, kh, kw = conv.weight.shape
    scale = num_classes / c_out
    conv.weight.normal_(0.0, noise_std * scale)
    a = torch.arange(c_in)
    b = torch.arange(c_out)
    match = (b[:, None] * num_classes // c_out) == (a[None, :] * num_classes // c_in)
    centre = conv.weight[:, :, kh // 2, kw // 2]
    centre[match] = scale
    conv.weight[:, :, kh // 2, kw // 2] = centre
    nn.init.zeros_(conv.bias)


def count_weights(module: ContextModule) -> int:
    """Number of convolution weights, biases apart (64 C^2 for the basic Dilation8 module)."""
    return sum(conv.weight.numel() for conv in module.convs())


__all__ = ["ContextModule", "SCHEDULES", "resolve_dilations", "receptive_field", "count_weights"]
