"""Analytic MAC counts equal PyTorch's own FLOP counter on the real modules (meta tensors: no
compute), and the headline numbers of the performance issue."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dilatedseg.flops import (
    context_macs,
    frontend_macs,
    gpu_peak_tflops,
    segmenter_macs,
    tiles,
)
from dilatedseg.inference import predict_logits
from dilatedseg.models import ContextModule, FrontEnd, Segmenter


def counted_macs(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


def test_vgg16_cityscapes_image_cost():
    same = frontend_macs("vgg16", 1024, 2048, "same", num_classes=19)
    assert round(same.total / 1e12, 2) == 4.73
    fc6 = next(layer for layer in same.layers if layer.name == "fc6")
    assert fc6.out_shape == (4096, 128, 256)
    assert round(fc6.macs / same.total, 2) == 0.71
    # The authors' valid geometry also convolves the 186 px reflected margin.
    assert round(frontend_macs("vgg16", 1024, 2048, "valid", 19).total / 1e12, 2) == 5.14


@pytest.mark.parametrize("arch,padding,size", [("vgg16", "valid", (1024, 2048)),
                                               ("vgg16", "same", (500, 375)),
                                               ("tiny", "valid", (101, 67)),
                                               ("tiny", "same", (64, 48))])
def test_frontend_matches_torch_flop_counter(arch, padding, size):
    with torch.device("meta"):  # the dilated fc6: space-to-batch (the training default) also
        # convolves the padding that rounds its sub-grids up, work that MFU does not count
        frontend = FrontEnd(21, arch=arch, padding=padding, fc6_space_to_batch=False)
        image = torch.empty(2, 3, *size)
    count = frontend_macs(arch, *size, padding=padding, num_classes=21)
    assert counted_macs(lambda: frontend(image)) == 2 * count.total

    def train_step():
        frontend(image).sum().backward()

    assert counted_macs(train_step) == 2 * count.training()
    assert count.training() < 3 * count.total  # the image needs no gradient


@pytest.mark.parametrize("variant,schedule,padding", [
    ("basic", "dilation10", "same"), ("large", "dilation8", "same"),
    ("large", "dilation8", "valid"),  # the published VOC model's geometry
    ("basic", [1, 2, 1], "valid"),
])
def test_context_matches_torch_flop_counter(variant, schedule, padding):
    with torch.device("meta"):
        module = ContextModule(19, variant=variant, dilations=schedule, padding=padding)
        logits = torch.empty(1, 19, 64, 96)
    count = context_macs(19, variant, schedule, 64, 96, padding)
    assert counted_macs(lambda: module(logits)) == count.total


def test_tiled_segmenter_matches_torch_flop_counter():
    with torch.device("meta"):
        segmenter = Segmenter(FrontEnd(19), ContextModule(19, dilations="dilation10"),
                              upsample="deconv")
        image = torch.empty(1, 3, 1024, 2048)
    assert tiles(1024, 2048, (1024, 1024)) == [(1024, 1024), (1024, 1024)]
    count = segmenter_macs("vgg16", 1024, 2048, 19, tile=(1024, 1024))
    with torch.no_grad():
        assert counted_macs(lambda: predict_logits(segmenter, image, (1024, 1024))) == \
            count.total
    # Two 1396 x 1396 tiles do more work than one 1396 x 2420 whole-image pass.
    assert count.total > segmenter_macs("vgg16", 1024, 2048, 19).total


def test_gpu_peaks():
    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert gpu_peak_tflops("NVIDIA H200", "fp32") == 67.0
    assert gpu_peak_tflops("NVIDIA GeForce GTX 1080", "bf16") is None


# (image height, width), tile: partial tiles; an image of exactly 2 x 2 tiles; an image
# smaller than its tile; one tile whose width is no multiple of 8 (as KITTI's 1268).
WHOLE_NETWORK_CASES = [((61, 83), (24, 32)), ((48, 64), (24, 32)), ((13, 21), (24, 32)),
                       ((17, 30), (24, 36))]


@pytest.mark.parametrize("padding,variant,context_padding,upsample", [
    ("valid", "large", "valid", "zoom"),  # the published VOC / CamVid / KITTI geometry
    ("valid", "basic", "same", "deconv"),  # Cityscapes'
    ("same", None, "same", "bilinear"),
])
def test_whole_network_tiles_match_torch_flop_counter(padding, variant, context_padding,
                                                      upsample):
    """With tile_whole_network every tile runs the whole network on a full deploy input: the
    count follows that mode, on a small network run for real."""
    frontend = FrontEnd(5, arch="tiny", padding=padding, dropout=0.0)
    context = (None if variant is None else
               ContextModule(5, variant=variant, dilations=[1, 2, 4, 1], padding=context_padding))
    segmenter = Segmenter(frontend, context, upsample=upsample).eval()
    for size, tile in WHOLE_NETWORK_CASES:
        count = segmenter_macs("tiny", *size, 5, variant, [1, 2, 4, 1], padding, upsample, tile,
                               context_padding, tile_whole_network=True)
        with torch.no_grad():
            image = torch.rand(1, 3, *size) * 255
            ran = counted_macs(predict_logits, segmenter, image, tile, True)
        assert ran == count.total, (size, tile)


def test_whole_network_tiles_of_the_published_models():
    """Cityscapes' 1024x2048 is two whole 1396 x 1396 deploy inputs in either mode (the same
    work); a 500 x 375 VOC image is one 900 x 900 deploy input instead of a 876 x 748 pass."""
    with torch.device("meta"):
        cityscapes = Segmenter(FrontEnd(19), ContextModule(19, dilations="dilation10"),
                               upsample="deconv")
        voc = Segmenter(FrontEnd(21), ContextModule(21, "large", "dilation8", padding="valid"),
                        upsample="zoom")
        street, photo = torch.empty(1, 3, 1024, 2048), torch.empty(1, 3, 375, 500)
    tile = (1024, 1024)
    count = segmenter_macs("vgg16", 1024, 2048, 19, tile=tile, tile_whole_network=True)
    assert count.total == segmenter_macs("vgg16", 1024, 2048, 19, tile=tile).total
    fc6 = [layer for layer in count.layers if layer.name == "fc6"]
    assert [layer.out_shape for layer in fc6] == [(4096, 128, 128)] * 2
    with torch.no_grad():
        assert counted_macs(lambda: predict_logits(cityscapes, street, tile, True)) == \
            count.total
    count = segmenter_macs("vgg16", 375, 500, 21, "large", "dilation8", upsample="zoom",
                           tile=(528, 528), context_padding="valid", tile_whole_network=True)
    fc6 = next(layer for layer in count.layers if layer.name == "fc6")
    assert fc6.out_shape == (4096, 66, 66)
    whole = segmenter_macs("vgg16", 375, 500, 21, "large", "dilation8", upsample="zoom",
                           tile=(528, 528), context_padding="valid")
    assert next(layer for layer in whole.layers if layer.name == "fc6").out_shape == \
        (4096, 47, 63)
    with torch.no_grad():
        assert counted_macs(lambda: predict_logits(voc, photo, (528, 528), True)) == count.total
        assert counted_macs(lambda: predict_logits(voc, photo, (528, 528))) == whole.total
