"""The GPU fast path on a real GPU: skipped without CUDA (CI never has one); run them where a GPU
is (`python -m pytest tests/test_cuda.py`). Each compares the fast path on the device with the
plain float32 computation, so a wrong kernel, layout or precision shows as a number, not only a
crash. DILATEDSEG_TEST_DEVICE=cpu runs the same checks on the CPU (their logic, not the GPU)."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch

from dilatedseg.inference import predict_logits
from dilatedseg.models import ContextModule, DenseCRF, FrontEnd, Segmenter
from dilatedseg.module import SegmentationModule

DEVICE = os.environ.get("DILATEDSEG_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                                reason="needs CUDA")


@pytest.fixture(autouse=True)
def exact_float32():
    """Plain float32 references: no TF32 in the cuDNN / cuBLAS comparisons."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def test_vgg16_bf16_channels_last_matches_float32():
    torch.manual_seed(0)
    frontend = FrontEnd(19, arch="vgg16", dropout=0.0).eval()
    image = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        expected = frontend(image)
        fast = frontend.to(DEVICE).to(memory_format=torch.channels_last)
        with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16):
            got = fast(image.to(DEVICE).contiguous(memory_format=torch.channels_last))
    assert got.shape == expected.shape
    assert relative_error(got.cpu(), expected) < 3e-2  # bf16 keeps ~3 significant digits


@pytest.mark.parametrize("max_sub_batch", [64, 5])  # one call; chunks of 5 of the 32
def test_space_to_batch_fc6_on_device_equals_dilated(max_sub_batch):
    torch.manual_seed(0)
    plain = FrontEnd(5, arch="vgg16", dropout=0.0, fc6_space_to_batch=False).eval().to(DEVICE)
    fast = FrontEnd(5, arch="vgg16", dropout=0.0, fc6_space_to_batch=True).eval().to(DEVICE)
    fast.load_state_dict(plain.state_dict())
    fast.features.fc6.max_sub_batch = max_sub_batch
    image = torch.randn(2, 3, 72, 88, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(fast(image), plain(image), rtol=1e-4, atol=1e-4)


def test_default_fc6_takes_space_to_batch_on_cuda_in_inference():
    fc6 = FrontEnd(5, arch="vgg16").features.fc6.to(DEVICE)
    with torch.inference_mode():
        assert fc6.use_space_to_batch(torch.zeros(1, 512, 30, 30, device=DEVICE)) == \
            (torch.device(DEVICE).type == "cuda")


def test_tiled_inference_on_device_equals_cpu():
    torch.manual_seed(0)
    model = Segmenter(FrontEnd(19, arch="tiny", dropout=0.0),
                      ContextModule(19, dilations="dilation10"), upsample="deconv").eval()
    image = torch.randint(0, 256, (1, 3, 120, 200), dtype=torch.uint8)
    with torch.no_grad():
        expected = predict_logits(model, image, (48, 64))
        got = predict_logits(model.to(DEVICE), image.to(DEVICE), (48, 64)).cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_crf_rnn_gradients_on_device_equal_cpu():
    torch.manual_seed(0)
    crf = DenseCRF(4, trainable=True, iterations=3)
    logits = torch.randn(1, 4, 24, 32, requires_grad=True)
    image = torch.rand(1, 3, 24, 32) * 255
    crf(logits, image).square().mean().backward()
    expected = logits.grad.clone()
    device_logits = logits.detach().to(DEVICE).requires_grad_()
    crf.to(DEVICE)(device_logits, image.to(DEVICE)).square().mean().backward()
    torch.testing.assert_close(device_logits.grad.cpu(), expected, rtol=1e-4, atol=1e-6)


def test_compiled_context_module_with_cuda_graphs_equals_eager():
    torch.manual_seed(0)
    module = ContextModule(19, dilations="dilation10").to(DEVICE).eval()
    logits = torch.randn(2, 19, 64, 128, device=DEVICE).relu()
    with torch.no_grad():
        expected = module(logits).clone()
        module.compile(mode="reduce-overhead" if DEVICE == "cuda" else "default")
        for _ in range(3):  # warm-up, recording, replay
            got = module(logits).clone()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_confusion_and_category_iou_on_device_equal_cpu():
    """Validation metrics stay on the device: the int64 confusion matrix and the Cityscapes
    category IoU built from it (CUDA has no int64 matrix product)."""
    pytest.importorskip("albumentations")  # dilatedseg.data's transforms
    from dilatedseg.data.cityscapes import CATEGORIES
    from dilatedseg.metrics import ConfusionMatrix, category_iou

    torch.manual_seed(0)
    prediction, label = torch.randint(0, 19, (2, 64, 64)), torch.randint(0, 19, (2, 64, 64))
    label[:, :8] = 255
    results = []
    for device in ("cpu", DEVICE):
        confusion = ConfusionMatrix(19, 255).to(device)
        confusion.update(prediction.to(device), label.to(device))
        matrix = confusion.compute()
        assert matrix.device.type == torch.device(device).type
        results.append((matrix.cpu(), category_iou(matrix, list(CATEGORIES))))
    assert torch.equal(results[0][0], results[1][0]) and results[0][1] == results[1][1]


def test_bf16_mixed_fit_on_device(tmp_path):
    """A short training run through Lightning on the device, bf16-mixed, with the recipes'
    context-margin crops and uint8 batches: weights in channels_last, loss finite and fp32."""
    pytest.importorskip("albumentations")  # the data modules' transforms
    from fixtures_datasets import assert_scored

    from dilatedseg.data import ShapesDataModule
    from dilatedseg.models.frontend import valid_shrinkage

    losses, layouts = [], []

    class Probe(L.Callback):  # during training: Lightning moves the module to the CPU after fit
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].detach())
            weight = pl_module.model.frontend.features.conv1_1.weight
            layouts.append((weight.device.type,
                            weight.is_contiguous(memory_format=torch.channels_last)))

    data = ShapesDataModule(root=str(tmp_path / "shapes"), train_size=16, val_size=4,
                            test_size=4, image_size=64, batch_size=4, val_batch_size=4,
                            num_workers=0, crop_size=48,
                            context_margin=valid_shrinkage("tiny") // 2)
    module = SegmentationModule(4, list(data.classes), arch="tiny", padding="valid",
                                optimizer="adam", lr_schedule="constant")
    accelerator = "gpu" if DEVICE == "cuda" else "cpu"
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision="bf16-mixed",
                        max_epochs=1, limit_train_batches=3, logger=False,
                        enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=1, num_sanity_val_steps=0, callbacks=[Probe()],
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    assert len(losses) == 3 and all(loss.dtype == torch.float32 for loss in losses)
    assert all(torch.isfinite(loss) for loss in losses)
    assert set(layouts) == {(torch.device(DEVICE).type, DEVICE == "cuda")}
    assert_scored({k: float(v) for k, v in trainer.callback_metrics.items()}, data.classes)
