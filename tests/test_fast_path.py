"""The GPU fast path's switches, checked on CPU: space-to-batch fc6 equals the dilated conv,
bf16 autocast keeps the loss and the CRF in float32, channels_last and torch.compile change no
numbers nor checkpoint names, and the data module picks its workers."""

from __future__ import annotations

import importlib.util
import os
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from dilatedseg.data import ShapesDataModule
from dilatedseg.data.base import default_num_workers
from dilatedseg.models import DenseCRF, FrontEnd, Segmenter
from dilatedseg.models.frontend import SpaceToBatchConv2d
from dilatedseg.module import SegmentationModule

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("size,padding,dilation,kernel", [
    ((40, 37), 0, 4, 7),  # fc6 in valid geometry, sizes not multiples of 4
    ((33, 50), 12, 4, 7),  # fc6 in same geometry
    ((25, 25), 0, 4, 7),  # a single output pixel
    ((31, 29), 2, 2, 3),  # conv5-like
    ((28, 28), 0, 4, 7),  # no padding needed at all
])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_space_to_batch_equals_dilated_conv_exactly(size, padding, dilation, kernel, layout):
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 5, kernel, padding=padding, dilation=dilation).double()
    fast = SpaceToBatchConv2d(6, 5, kernel, padding=padding, dilation=dilation).double()
    with torch.no_grad():  # small integers: every sum is exact, whatever the order
        plain.weight.copy_(torch.randint(-3, 4, plain.weight.shape))
        plain.bias.copy_(torch.randint(-3, 4, plain.bias.shape))
    fast.load_state_dict(plain.state_dict())
    fast.to(memory_format=layout)
    x = torch.randint(-5, 6, (2, 6, *size)).double()
    x = x.contiguous(memory_format=layout).requires_grad_()
    expected, got = plain(x), fast(x)
    assert torch.equal(got, expected)
    # channels_last (CUDA's fast path) comes out channels_last: no conversion at fc7.
    if layout == torch.channels_last:
        assert got.stride()[1] == 1
    (grad_plain,) = torch.autograd.grad(expected.square().sum(), x)
    (grad_fast,) = torch.autograd.grad(got.square().sum(), x)
    assert torch.equal(grad_fast, grad_plain)


def test_frontend_space_to_batch_flag():
    torch.manual_seed(0)
    plain = FrontEnd(5, arch="vgg16", padding="same", dropout=0.0).double().eval()
    fast = FrontEnd(5, arch="vgg16", padding="same", dropout=0.0,
                    fc6_space_to_batch=True).double().eval()
    assert type(fast.features.fc6) is SpaceToBatchConv2d
    assert type(fast.features.conv5_1) is nn.Conv2d
    fast.load_state_dict(plain.state_dict())  # same names: weights and checkpoints carry over
    image = torch.randn(1, 3, 72, 56, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(image), plain(image), rtol=1e-12, atol=1e-12)


def test_space_to_batch_by_default_only_where_it_pays():
    """None (the default): on CUDA always (cuDNN's dilated fc6 ran at 7% of an H200's peak),
    elsewhere when a backward pass follows (the dilated backward is ~50x slower on the CPU,
    whose dilated forward is faster than this path)."""
    frontend = FrontEnd(5, arch="vgg16")
    fc6 = frontend.features.fc6
    assert type(fc6) is SpaceToBatchConv2d and fc6.enabled is None
    x = torch.zeros(1, 512, 30, 30)
    assert fc6.use_space_to_batch(x)  # training: weights want gradients
    with torch.no_grad():
        assert not fc6.use_space_to_batch(x)
    fc6.requires_grad_(False)  # a frozen front-end (the context stage)
    assert not fc6.use_space_to_batch(x)
    assert fc6.use_space_to_batch(x.clone().requires_grad_())  # gradients to the input
    fc6.requires_grad_(True)
    assert fc6.use_space_to_batch(torch.zeros(1, 512, 30, 30, device="meta"))  # any device
    on_cuda = types.SimpleNamespace(is_cuda=True, requires_grad=False)  # a CUDA tensor's flags
    with torch.inference_mode():
        assert fc6.use_space_to_batch(on_cuda)  # CUDA inference too
        assert not FrontEnd(5, fc6_space_to_batch=False).features.fc6.use_space_to_batch(on_cuda)
    assert FrontEnd(5, fc6_space_to_batch=True).features.fc6.use_space_to_batch(x.detach())
    with torch.no_grad():
        assert FrontEnd(5, fc6_space_to_batch=True).features.fc6.use_space_to_batch(x)
    assert not FrontEnd(5, fc6_space_to_batch=False).features.fc6.use_space_to_batch(x)


def test_bf16_mixed_training_keeps_loss_and_crf_in_float32(tiny_shapes):
    dtypes = {}

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            dtypes["loss"] = outputs["loss"].dtype
            with torch.autocast("cpu", dtype=torch.bfloat16):
                dtypes["logits"] = pl_module.model(batch["image"], use_crf=False).dtype

    data = ShapesDataModule(root=str(tiny_shapes), train_size=32, val_size=8, test_size=8,
                            batch_size=4, num_workers=0)
    module = SegmentationModule(4, arch="tiny", padding="same", optimizer="adam",
                                lr_schedule="constant")
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[Probe()])
    trainer.fit(module, datamodule=data)
    # The full-resolution logits are upsampled in float32 (bf16 would tie classes).
    assert dtypes == {"loss": torch.float32, "logits": torch.float32}
    assert torch.isfinite(trainer.callback_metrics["train/loss"])

    crf = DenseCRF(3, test_iterations=3).eval()
    logits, image = torch.randn(1, 3, 12, 16), torch.rand(1, 3, 12, 16) * 255
    with torch.autocast("cpu", dtype=torch.bfloat16):
        refined = crf(logits.bfloat16(), image)
    assert refined.dtype == torch.float32
    torch.testing.assert_close(refined, crf(logits.bfloat16().float(), image))


def test_deterministic_runs_skip_the_nan_fill_of_fresh_memory(tiny_shapes):
    data = ShapesDataModule(root=str(tiny_shapes), train_size=32, val_size=8, test_size=8,
                            batch_size=4, num_workers=0)
    module = SegmentationModule(4, arch="tiny", padding="same", lr_schedule="constant")
    trainer = L.Trainer(accelerator="cpu", deterministic="warn", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    try:
        trainer.fit(module, datamodule=data)
        assert torch.are_deterministic_algorithms_enabled()  # as the recipes ask
        assert not torch.utils.deterministic.fill_uninitialized_memory
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = True


@pytest.mark.parametrize("upsample", ["bilinear", "deconv", "zoom"])
def test_upsampling_runs_in_float32_under_autocast(upsample):
    segmenter = Segmenter(FrontEnd(3, arch="tiny", padding="same"), upsample=upsample)
    low = torch.randn(2, 3, 6, 8).bfloat16()  # what bf16 autocast makes of the 1/8 logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = segmenter.upsample_to(low, (45, 61))
    assert full.dtype == torch.float32 and full.shape[-2:] == (45, 61)
    torch.testing.assert_close(full, segmenter.upsample_to(low.float(), (45, 61)))
    assert segmenter.upsample_to(low.double(), (45, 61)).dtype == torch.float64  # kept


def test_channels_last_on_cuda_only():
    torch.manual_seed(0)
    module = SegmentationModule(4, stage="context", arch="tiny", padding="same", dropout=0.0)
    image = torch.rand(2, 3, 48, 40) * 255
    expected = module.model.eval()(image)
    module.apply_fast_path(torch.device("cpu"))  # nothing changes
    assert module.model.frontend.features.conv1_1.weight.is_contiguous()
    module.apply_fast_path(torch.device("cuda"))  # only the layout: the weights stay here
    conv = module.model.frontend.features.conv1_1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    torch.testing.assert_close(module.model(image), expected, rtol=1e-5, atol=1e-5)
    off = SegmentationModule(4, arch="tiny", padding="same", channels_last=False)
    off.apply_fast_path(torch.device("cuda"))
    assert off.model.frontend.features.conv1_1.weight.is_contiguous()


def test_compiled_context_module_equals_eager():
    """torch.compile (inductor, C++ on CPU) of the context module: same logits, same names."""
    torch.manual_seed(0)
    module = SegmentationModule(4, stage="context", arch="tiny", padding="same",
                                dilations=[1, 2, 1], compile=True).eval()
    names = list(module.state_dict())
    logits = torch.randn(2, 4, 12, 10).relu()
    with torch.no_grad():
        expected = module.model.context(logits)
        module.apply_fast_path(torch.device("cpu"))
        assert module.compiled and module.model.context._compiled_call_impl is not None
        got = module.model.context(logits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert list(module.state_dict()) == names


def test_default_num_workers():
    cores = len(os.sched_getaffinity(0))
    assert default_num_workers() == min(16, cores)
    assert default_num_workers(limit=1) == 1
    auto = ShapesDataModule(root="unused")
    assert auto.num_workers == auto.workers() == default_num_workers()
    auto.trainer = types.SimpleNamespace(num_devices=2)  # DDP: the cores are shared
    assert auto.workers() == max(1, min(32, cores) // 2)
    fixed = ShapesDataModule(root="unused", num_workers=0)
    fixed.trainer = auto.trainer
    assert fixed.num_workers == fixed.workers() == 0


def test_profile_fc6_flags_non_tensor_core_kernels(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as when run as a script
    spec = importlib.util.spec_from_file_location("profile_fc6",
                                                  REPO / "benchmarks/profile_fc6.py")
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    classify = profile.classify_kernel
    assert classify("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == \
        "tensor core"
    assert classify("cutlass_tensorop_bf16_s16816gemm_bf16_256x128_32x3_nt_align8") == \
        "tensor core"
    assert classify("implicit_convolve_sgemm<float, float, 128, 5, 5, 3, 3, 3, 1>") == "FLAG"
    assert classify("cudnn::detail::dgrad_engine<float, 512, 6, 5, 3, 3, 3, false>") == "FLAG"
    assert classify("void at::native::vectorized_elementwise_kernel<4, ...>") == "other"
    # cuDNN's plain float32 engines are xmma kernels too, without tensor cores:
    assert classify("sm80_xmma_fprop_implicit_gemm_f32f32_f32f32_f32_nchwkcrs_nchw") == "FLAG"
    assert classify("sm80_xmma_fprop_implicit_gemm_f32f32_tf32f32_f32_nhwckrsc_nhwc") == \
        "tensor core"
    assert classify("ampere_sgemm_128x64_nn") == "FLAG"


def test_space_to_batch_in_chunks_equals_one_call(monkeypatch):
    """The rearranged batch is convolved in chunks (cuDNN picks a slow kernel for large ones):
    same result and gradients as one call, also when the chunks do not divide the batch."""
    torch.manual_seed(0)
    conv = SpaceToBatchConv2d(3, 4, 3, dilation=2).double()
    x = torch.randn(3, 3, 17, 19, dtype=torch.float64, requires_grad=True)  # 12 sub-images
    whole = conv(x)
    (grad_whole,) = torch.autograd.grad(whole.square().sum(), x)
    monkeypatch.setattr(conv, "max_sub_batch", 5)
    calls = []
    monkeypatch.setattr(torch.nn.functional, "conv2d",
                        lambda chunk, *args: calls.append(len(chunk)) or
                        torch.conv2d(chunk, *args))
    chunked = conv(x)
    (grad_chunked,) = torch.autograd.grad(chunked.square().sum(), x)
    assert calls == [5, 5, 2]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_chunked, grad_whole, rtol=0, atol=1e-12)
