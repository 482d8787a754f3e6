"""ImageNet VGG-16 weights for the front-end.

The source is torchvision's VGG-16 state dict (``features.<i>.weight`` for the 13 convolutions,
``classifier.0`` / ``.3`` / ``.6`` for fc6 / fc7 / fc8), as a local file, a URL, or the
shorthand ``"imagenet"`` for torchvision's published file. Convolutions are matched in order;
fc6 (4096 x 25088) is reshaped to the 4096 x 512 x 7 x 7 convolution and fc7 to 4096 x 4096 x
1 x 1; the 1000-class fc8 is dropped and the front-end's ``final`` layer keeps its N(0, 1e-3)
initialisation. Torchvision (not the authors' Caffe) weights expect RGB input scaled to 0-1 and
normalised with the ImageNet mean and std: the :class:`Segmenter` does exactly that with its
default ``pixel_std`` (58.395, 57.12, 57.375 on a 0-255 scale), so keep that std when loading
them (the mean may be the dataset's, a small shift the fine-tuning absorbs).
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

VGG16_IMAGENET_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
_FEATURE_KEY = re.compile(r"^features\.(\d+)\.weight$")


class WeightsError(Exception):
    """Pretrained weights cannot be found, fetched or fitted; the message says what to do."""


def fetch_state_dict(source: str | Path, model_dir: str | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a local file or a URL (downloaded once into torch.hub's cache)."""
    source = VGG16_IMAGENET_URL if str(source) == "imagenet" else str(source)
    if "://" not in source:
        path = Path(source).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"pretrained weights {path} do not exist. Pass the path of torchvision's VGG-16 "
                f"state dict (download it from {VGG16_IMAGENET_URL}) or the URL itself.")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
            raise WeightsError(
                f"pretrained weights {path} cannot be read ({type(error).__name__}): the file is "
                f"damaged or not a saved state dict; download {VGG16_IMAGENET_URL} again") from None
    try:
        return torch.hub.load_state_dict_from_url(
            source, model_dir=model_dir, map_location="cpu", check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad hash a RuntimeError
        name = source.rsplit("/", 1)[-1]
        raise WeightsError(
            f"cannot fetch pretrained weights from {source}: {error}.\nOn a machine with "
            f"internet access download it (e.g. `curl -LO {source}`), copy it here and pass the "
            f"path instead: --model.pretrained=/path/to/{name} (or put it in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}/ where torch.hub looks first).") from None


def vgg16_to_frontend(state: Mapping[str, torch.Tensor], frontend: nn.Module
                      ) -> dict[str, torch.Tensor]:
    """Rename and reshape a torchvision-style VGG state dict into ``frontend.features`` keys."""
    convs = [(name, m) for name, m in frontend.features.named_children()
             if isinstance(m, nn.Conv2d)]
    hidden = [(name, m) for name, m in convs if not name.startswith("fc")]
    fcs = [(name, m) for name, m in convs if name.startswith("fc")]
    source_convs = sorted(int(m.group(1)) for k in state if (m := _FEATURE_KEY.match(k)))
    pairs = [(f"features.{i}", name, m) for i, (name, m) in zip(source_convs, hidden)]
    pairs += [(f"classifier.{i}", name, m) for i, (name, m) in zip((0, 3), fcs)]
    if len(source_convs) != len(hidden) or any(f"{src}.{kind}" not in state for src, _, _ in pairs
                                               for kind in ("weight", "bias")):
        raise WeightsError(
            f"the pretrained state dict does not look like torchvision's VGG for this front-end: "
            f"it has {len(source_convs)} 'features.<i>' convolutions (this front-end has "
            f"{len(hidden)}) and needs classifier.0 / classifier.3. Use {VGG16_IMAGENET_URL} "
            "with arch='vgg16'.")
    mapped = {}
    for src, name, conv in pairs:
        for kind in ("weight", "bias"):
            value, target = state[f"{src}.{kind}"], getattr(conv, kind)
            if value.numel() != target.numel():
                raise WeightsError(
                    f"pretrained {src}.{kind} has shape {tuple(value.shape)} but front-end layer "
                    f"{name} needs {tuple(target.shape)} (arch={getattr(frontend, 'arch', '?')})")
            mapped[f"features.{name}.{kind}"] = value.reshape(target.shape)
    return mapped


@torch.no_grad()
def load_vgg16_imagenet(frontend: nn.Module, source: str | Path | Mapping[str, torch.Tensor],
                        model_dir: str | None = None) -> list[str]:
    """Copy ImageNet VGG-16 weights into ``frontend`` (all but ``final``); returns the layers set.

    ``source``: a path, a URL, ``"imagenet"`` (torchvision's file) or an in-memory state dict.
    """
    state = source if isinstance(source, Mapping) else fetch_state_dict(source, model_dir)
    mapped = vgg16_to_frontend(state, frontend)
    own = frontend.state_dict()
    for key, value in mapped.items():
        own[key].copy_(value)
    return sorted({key.split(".")[1] for key in mapped})


__all__ = ["VGG16_IMAGENET_URL", "WeightsError", "fetch_state_dict", "load_vgg16_imagenet"]
