"""The authors' published Caffe models (fyu/dilation) loaded into a :class:`Segmenter`.

A ``.caffemodel`` file is a serialised Caffe ``NetParameter`` (protocol buffers). Only what the
weights need is read, with a small wire-format reader (no Caffe, no protobuf package):
``NetParameter.layer`` (field 100; the pre-2015 ``layers``, field 2, too), each layer's name,
type and ``blobs``, and each ``BlobProto``'s shape and float data. Field numbers are those of
BVLC's ``caffe.proto``.

Layers with weights are matched to the model by the names of the authors' deploy definitions
(fyu/dilation models/*_deploy.prototxt): conv1_1 ... conv5_3, fc6, fc7, the classifier
(``final``, or ``fc-final`` in the VOC model), then the context module's convolutions, prefixed
``ctx_`` (``ct_`` in the VOC model): conv1_1, conv1_2, conv2_1, conv3_1, ..., the last 3x3
layer fc1, the 1x1 final. Each layer's shape is checked, and so are its pad and dilation where
the file states them (Caffe saves each layer's ``convolution_param`` with its weights): the
schedules of one depth, and the two context paddings, have the same shapes. The frozen
``ctx_upsample`` deconvolution of the Cityscapes model must be the fixed bilinear kernel the
Segmenter builds for ``upsample="deconv"`` (Caffe's bilinear filler), and is not loaded.
conv1_1's input channels are reversed: the authors feed BGR, the Segmenter RGB.

The published models take mean-subtracted 0-255 input with no scaling (``pixel_std`` 1) and
place logit i at pixel 8i when they upsample (``upsample="zoom"``, their ``interp_map``; the
Cityscapes model's deconvolution is ``"deconv"``). Published files (pretrained/download_*.sh in
fyu/dilation): dilation8_pascal_voc.caffemodel, dilation8_camvid.caffemodel,
dilation7_kitti.caffemodel, dilation10_cityscapes.caffemodel.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from dilatedseg.models.segmenter import bilinear_upsampling_kernel
from dilatedseg.models.weights import WeightsError

NET_LAYER, NET_V1_LAYERS = 100, 2
LAYER_NAME, LAYER_TYPE, LAYER_BLOBS = 1, 2, 7  # LayerParameter
V1_NAME, V1_TYPE, V1_BLOBS = 4, 5, 6  # V1LayerParameter (type is an enum there)
BLOB_SHAPE, BLOB_DATA, BLOB_DOUBLE_DATA = 7, 5, 8  # BlobProto (1-4: legacy num/c/h/w)
V1_DECONVOLUTION = 39  # V1LayerParameter.LayerType.DECONVOLUTION
LAYER_CONV, V1_CONV = 106, 10  # convolution_param of LayerParameter / V1LayerParameter
CONV_FIELDS = {3: "pad", 18: "dilation"}  # ConvolutionParameter (repeated uint32)


class CaffeLayer(NamedTuple):
    """One layer of a .caffemodel: name, type, weight blobs and the convolution parameters it
    states (``{"pad": [...], "dilation": [...]}``, only those present)."""

    name: str
    kind: str
    blobs: list[np.ndarray]
    conv: dict[str, list[int]]


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 64:  # at most 10 bytes
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    raise ValueError("a varint longer than 10 bytes")


def _fields(data: memoryview):
    """(field number, wire type, value) of each field of a message: an int for varints, the
    raw bytes otherwise."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated message")
        yield field, wire, value


def _bytes(wire: int, value) -> memoryview:
    """A length-delimited field (string, bytes, message)."""
    if wire != 2:
        raise ValueError(f"wire type {wire} where a string or message belongs")
    return value


def _ints(wire: int, value) -> list[int]:
    """A repeated integer field, packed (wire type 2) or not."""
    if wire == 0:
        return [value]
    if wire != 2:
        raise ValueError(f"wire type {wire} where an integer belongs")
    out, pos = [], 0
    while pos < len(value):
        number, pos = _varint(value, pos)
        out.append(number)
    return out


def _blob(data: memoryview) -> np.ndarray:
    shape, legacy, chunks = None, {}, []
    for field, wire, value in _fields(data):
        if field == BLOB_SHAPE:
            shape = [d for f, w, v in _fields(_bytes(wire, value)) if f == 1
                     for d in _ints(w, v)]
        elif field == BLOB_DATA:  # packed (wire 2) or one float (wire 5)
            chunks.append(np.frombuffer(value if wire == 5 else _bytes(wire, value), "<f4"))
        elif field == BLOB_DOUBLE_DATA:
            chunks.append(np.frombuffer(value if wire == 1 else _bytes(wire, value),
                                        "<f8").astype(np.float32))
        elif field in (1, 2, 3, 4) and wire == 0:
            legacy[field] = value
    values = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    if shape is None:  # legacy num / channels / height / width (Caffe's default: 0)
        shape = [legacy.get(i, 0) for i in (1, 2, 3, 4)] if legacy else [values.size]
    if int(np.prod(shape)) != values.size:
        raise ValueError(f"a blob of shape {shape} holds {values.size} values")
    return values.reshape(shape)


def missing_caffemodel(path: str | Path) -> WeightsError:
    return WeightsError(f"Caffe model {path} does not exist: download it with fyu/dilation's "
                        "pretrained/download_<dataset>.sh and pass its path")


def _conv_param(data: memoryview) -> dict[str, list[int]]:
    stated: dict[str, list[int]] = {}
    for field, wire, value in _fields(data):
        if field in CONV_FIELDS:
            stated.setdefault(CONV_FIELDS[field], []).extend(_ints(wire, value))
    return stated


def read_caffemodel(path: str | Path) -> list[CaffeLayer]:
    """Every layer of a .caffemodel, in the file's order."""
    path = Path(path)
    if not path.is_file():
        raise missing_caffemodel(path)
    data = memoryview(path.read_bytes())
    layers = []
    try:
        for field, wire, value in _fields(data):
            if field not in (NET_LAYER, NET_V1_LAYERS):
                continue
            v1 = field == NET_V1_LAYERS
            keys = (V1_NAME, V1_TYPE, V1_BLOBS, V1_CONV) if v1 else (
                LAYER_NAME, LAYER_TYPE, LAYER_BLOBS, LAYER_CONV)
            name, kind, blobs, conv = "", "", [], {}
            for inner, inner_wire, item in _fields(_bytes(wire, value)):
                if inner == keys[0]:
                    name = bytes(_bytes(inner_wire, item)).decode()
                elif inner == keys[1] and v1:  # an enum
                    kind = "Deconvolution" if item == V1_DECONVOLUTION else str(item)
                elif inner == keys[1]:
                    kind = bytes(_bytes(inner_wire, item)).decode()
                elif inner == keys[2]:
                    blobs.append(_blob(_bytes(inner_wire, item)))
                elif inner == keys[3]:
                    conv.update(_conv_param(_bytes(inner_wire, item)))
            layers.append(CaffeLayer(name, kind, blobs, conv))
    except (ValueError, IndexError, UnicodeDecodeError) as error:
        raise WeightsError(f"cannot read Caffe model {path}: {error} (not a .caffemodel, or "
                           "cut short: download it again)") from None
    if not any(layer.blobs for layer in layers):
        raise WeightsError(f"Caffe model {path} holds no layer weights")
    return layers


def context_layer_names(depth: int) -> list[str]:
    """The authors' names of a context module's convolutions (without the ``ctx_`` prefix) for
    ``depth`` 3x3 layers: conv1_1, conv1_2, conv2_1, conv3_1, ..., fc1 (the last 3x3), final."""
    names = ["conv1_1", "conv1_2"] + [f"conv{i}_1" for i in range(2, depth)]
    return names[:depth - 1] + ["fc1", "final"]


def _targets(segmenter: nn.Module) -> list[tuple[tuple[str, ...], str, nn.Conv2d, int]]:
    """(the authors' names for it, state-dict prefix, convolution, zero padding) of each of the
    Segmenter's convolutions in network order; the padding of the context module's first layer
    includes the module's one pad before it (``padding="valid"``)."""
    frontend, context = segmenter.frontend, segmenter.context
    targets = [((name,), f"frontend.features.{name}", m, m.padding[0])
               for name, m in frontend.features.named_children() if isinstance(m, nn.Conv2d)]
    targets.append((("final", "fc-final"), "frontend.final", frontend.final, 0))
    if context is not None:
        convs = [(key, m) for key, m in context.layers.named_children()
                 if isinstance(m, nn.Conv2d)]
        for i, (name, (key, m)) in enumerate(zip(context_layer_names(len(convs) - 1), convs)):
            pad = m.padding[0] + (context.margin if i == 0 else 0)
            targets.append(((f"ctx_{name}", f"ct_{name}"), f"context.layers.{key}", m, pad))
    return targets


def _check_geometry(layer: CaffeLayer, conv: nn.Conv2d, pad: int, prefix: str,
                    source: str) -> None:
    """The dilation (where stated) and the pad (Caffe's default 0) of ``layer`` are ours."""
    stated_dilation = layer.conv.get("dilation")
    if stated_dilation and set(stated_dilation) != {conv.dilation[0]}:
        raise WeightsError(
            f"{source}: layer {layer.name} has dilation {stated_dilation[0]}, this model's "
            f"{prefix} {conv.dilation[0]}: set --model.dilations to its context module's "
            "schedule (dilation7, dilation8 or dilation10 for the published models)")
    stated_pad = layer.conv.get("pad") or [0]
    if set(stated_pad) != {pad}:
        same = stated_pad[0] == conv.dilation[0]  # the urban models; VOC's: one pad, then none
        option = ("--model.padding=valid" if prefix.startswith("frontend") else
                  f"--model.context_padding={'same' if same else 'valid'}")
        raise WeightsError(f"{source}: layer {layer.name} has pad {stated_pad[0]}, this model's "
                           f"{prefix} {pad}: set {option}")


def _check_upsampling(layer: CaffeLayer, num_classes: int, source: str) -> None:
    """A deconvolution the Segmenter's ``upsample="deconv"`` replaces must compute the same."""
    kernel = bilinear_upsampling_kernel(num_classes).numpy()
    weight = layer.blobs[0]
    if weight.shape != kernel.shape or not np.allclose(weight, kernel, rtol=0, atol=1e-6):
        raise WeightsError(
            f"{source}: layer {layer.name} ({list(weight.shape)}) is not the fixed bilinear x8 "
            f"upsampling that upsample='deconv' computes (grouped, {list(kernel.shape)}): "
            "not one of the authors' published models")


def caffe_state_dict(layers: list[CaffeLayer], segmenter: nn.Module,
                     source: str = "the Caffe model") -> dict[str, torch.Tensor]:
    """Segmenter state-dict entries (``frontend.*``, ``context.*``) from the layers of
    :func:`read_caffemodel`; a WeightsError names the first layer that does not fit."""
    weighted = {layer.name: layer for layer in layers
                if layer.blobs and layer.kind != "Deconvolution"}
    state = {}
    for names, prefix, conv, pad in _targets(segmenter):
        layer = next((weighted.pop(name) for name in names if name in weighted), None)
        if layer is None:
            raise WeightsError(
                f"{source} has no layer {' or '.join(names)} for this model's {prefix} (its "
                f"layers with weights: {', '.join(x.name for x in layers if x.blobs)}): match its "
                "context module (--model.context_variant, dilations, context_padding), or "
                "load its front-end alone (stage frontend)")
        weight = layer.blobs[0]
        if weight.size != conv.weight.numel() or weight.shape[-2:] != conv.weight.shape[-2:]:
            raise WeightsError(
                f"{source}: layer {layer.name} has weights of shape {list(weight.shape)}, this "
                f"model's {prefix} {list(conv.weight.shape)} (same arch vgg16, num_classes and "
                "context variant as the published model?)")
        _check_geometry(layer, conv, pad, prefix, source)
        tensor = torch.from_numpy(weight.reshape(conv.weight.shape).copy())
        state[f"{prefix}.weight"] = tensor.flip(1) if prefix.endswith("conv1_1") else tensor
        if conv.bias is not None:
            bias = layer.blobs[1] if len(layer.blobs) > 1 else np.zeros(conv.out_channels,
                                                                        np.float32)
            state[f"{prefix}.bias"] = torch.from_numpy(bias.reshape(-1).copy())
    if segmenter.context is None:  # a front-end alone: the rest of the file is not used
        return state
    if weighted:
        raise WeightsError(
            f"{source} has layers with weights this model lacks ({', '.join(weighted)}): "
            "match its context module (--model.context_variant, dilations, context_padding)")
    if getattr(segmenter, "upsample", None) == "deconv":
        for layer in layers:
            if layer.kind == "Deconvolution" and layer.blobs:
                _check_upsampling(layer, segmenter.frontend.final.out_channels, source)
    return state


def check_caffe_input(path: str | Path, pixel_std) -> None:
    """The authors' models take mean-subtracted 0-255 input without scaling (std 1)."""
    if not Path(path).is_file():
        raise missing_caffemodel(path)
    if [float(s) for s in pixel_std] != [1.0, 1.0, 1.0]:
        raise WeightsError(f"{path} is one of the authors' Caffe models, which take 0-255 "
                           "input without scaling: set --model.pixel_std=[1,1,1]")


def load_caffemodel(segmenter: nn.Module, path: str | Path) -> None:
    """Load one of the authors' published models into ``segmenter`` (see the module doc)."""
    state = caffe_state_dict(read_caffemodel(path), segmenter, str(path))
    segmenter.load_state_dict(state, strict=False)
