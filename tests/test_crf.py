"""DenseCRF / CRF-RNN: shapes, refinement, input checks, gradients, pydensecrf agreement."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dilatedseg.models.crf import DenseCRF

pytestmark = pytest.mark.usefixtures("one_thread")


def two_regions(h: int = 24, w: int = 32, seed: int = 0):
    """Image with a red left half and a blue right half, labels, and noisy unary logits."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(h, w, dtype=torch.long)
    labels[:, w // 2 :] = 1
    colours = torch.tensor([[200.0, 40.0, 40.0], [40.0, 60.0, 200.0]])
    image = colours[labels].permute(2, 0, 1) + 8 * torch.randn(3, h, w, generator=g)
    image = image.clamp(0, 255).round()
    logits = F.one_hot(labels, 2).permute(2, 0, 1).float() + torch.randn(2, h, w, generator=g)
    return logits[None], image[None], labels[None]


def blob_scene(h: int = 60, w: int = 80, classes: int = 5, seed: int = 0):
    """A natural-ish image (smooth blobs + noise, integer RGB) and smooth noisy logits."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    centres = torch.rand(classes, 2, generator=g) * torch.tensor([h, w])
    dist = (ys[None] - centres[:, :1, None]) ** 2 + (xs[None] - centres[:, 1:, None]) ** 2
    labels = dist.argmin(0)
    palette = torch.rand(classes, 3, generator=g) * 200 + 20
    shade = 20 * torch.sin(xs / 9.0) * torch.cos(ys / 7.0)
    image = palette[labels].permute(2, 0, 1) + shade + 10 * torch.randn(3, h, w, generator=g)
    image = image.clamp(0, 255).round()
    coarse = torch.randn(1, classes, h // 10, w // 10, generator=g)
    logits = (
        2.0 * F.one_hot(labels, classes).permute(2, 0, 1).float()
        + F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
        + 1.5 * torch.randn(classes, h, w, generator=g)
    )
    return logits[None], image[None], labels[None]


def test_output_shape_and_dtype():
    logits = torch.randn(2, 4, 20, 24)
    image = torch.rand(2, 3, 20, 24) * 255
    out = DenseCRF(4, iterations=2).eval()(logits, image)
    assert out.shape == logits.shape
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_refines_noisy_unary():
    logits, image, labels = two_regions()
    before = (logits.argmax(1) == labels).float().mean()
    with torch.no_grad():
        refined = DenseCRF(2, theta_alpha=20.0, theta_beta=10.0).eval()(logits, image)
    after = (refined.argmax(1) == labels).float().mean()
    assert before < 0.9
    assert after > before + 0.1
    assert after > 0.97


def test_bad_input_raises():
    crf = DenseCRF(3)
    logits, image = torch.randn(1, 3, 8, 10), torch.rand(1, 3, 8, 10) * 255
    with pytest.raises(ValueError, match="spatial size"):
        crf(logits, image[..., :9])
    with pytest.raises(ValueError, match="NaN or Inf"):
        crf(logits.masked_fill(torch.rand_like(logits) < 0.1, float("nan")), image)
    with pytest.raises(ValueError, match="classes"):
        crf(torch.randn(1, 4, 8, 10), image)
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        crf(logits, image[:, :1])
    with pytest.raises(ValueError, match="batch"):
        crf(logits, image.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match=r"expected logits \(B, C, H, W\)"):
        crf(logits[0], image[0])
    with pytest.raises(ValueError, match=r"compatibility must be \(3, 3\), got \(2, 2\)"):
        DenseCRF(3, compatibility=torch.eye(2))


def test_trainable_parameters_get_gradients():
    logits, image, labels = two_regions(12, 16)
    logits.requires_grad_(True)
    crf = DenseCRF(2, iterations=3, trainable=True, spatial_weight=2.0).train()
    names = {name for name, _ in crf.named_parameters()}
    assert names == {"spatial_weight", "bilateral_weight", "compatibility"}
    # CRF-RNN's C x C kernel weights, initialised to w * I
    torch.testing.assert_close(crf.spatial_weight.detach(), 2.0 * torch.eye(2))
    torch.testing.assert_close(crf.bilateral_weight.detach(), 5.0 * torch.eye(2))
    loss = F.cross_entropy(crf(logits, image), labels)
    loss.backward()
    for p in [logits, *crf.parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all()
        assert p.grad.abs().sum() > 0
    off_diagonal = ~torch.eye(2, dtype=torch.bool)
    assert (crf.spatial_weight.grad[off_diagonal] != 0).all()
    assert (crf.bilateral_weight.grad[off_diagonal] != 0).all()


def scalar_mean_field(crf, logits, image, ws, wb, compat, iterations):
    """The trainable CRF's update before its kernel weights became matrices (batch of one)."""
    c, h, w = logits.shape[1:]
    unary = logits[0].reshape(c, h * w).t().contiguous()
    spatial, bilateral = crf.lattices(image[0])
    ms, mb = -ws * compat.t(), -wb * compat.t()
    x = unary
    for _ in range(iterations):
        q = torch.softmax(x, 1)
        x = torch.addmm(unary, spatial.filter(q, normalize=True), ms).addmm_(
            bilateral.filter(q, normalize=True), mb)
    return x.t().reshape(1, c, h, w)


def test_trainable_crf_at_initialisation_is_the_scalar_crf():
    logits, image, _ = blob_scene(20, 30, classes=4)
    crf = DenseCRF(4, iterations=3, trainable=True, spatial_weight=2.5).train()
    expected = scalar_mean_field(crf, logits, image, 2.5, 5.0, -torch.eye(4), 3)
    assert torch.equal(crf(logits, image).detach(), expected)


def test_trainable_update_is_crf_rnn():
    """logits <- U - mu (W_s K_s Q + W_b K_b Q) with (C, C) matrices (crfasrnn's
    MeanfieldIteration: kernel weights, then compatibility, subtracted from the unary)."""
    torch.manual_seed(0)
    logits, image, _ = blob_scene(12, 16, classes=3)
    crf = DenseCRF(3, iterations=1, trainable=True).train()
    ws, wb, mu = torch.randn(3, 3), torch.randn(3, 3), torch.randn(3, 3)
    with torch.no_grad():
        crf.spatial_weight.copy_(ws)
        crf.bilateral_weight.copy_(wb)
        crf.compatibility.copy_(mu)
        out = crf(logits, image)
    spatial, bilateral = crf.lattices(image[0])
    q = torch.softmax(logits[0].reshape(3, -1), 0)
    ks_q = spatial.filter(q.t().contiguous(), normalize=True).t()
    kb_q = bilateral.filter(q.t().contiguous(), normalize=True).t()
    expected = logits[0].reshape(3, -1) - mu @ (ws @ ks_q + wb @ kb_q)
    torch.testing.assert_close(out[0].reshape(3, -1), expected)


def test_loads_checkpoints_with_scalar_kernel_weights():
    """A CRF-RNN saved with scalar kernel weights w loads them as w * I, same outputs."""
    logits, image, _ = blob_scene(16, 20, classes=3)
    compat = -torch.eye(3) + 0.2 * torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    old = {"spatial_weight": torch.tensor(2.5), "bilateral_weight": torch.tensor(4.0),
           "compatibility": compat}
    crf = DenseCRF(3, iterations=2, trainable=True).train()
    crf.load_state_dict(old)
    torch.testing.assert_close(crf.spatial_weight.detach(), 2.5 * torch.eye(3))
    torch.testing.assert_close(crf.bilateral_weight.detach(), 4.0 * torch.eye(3))
    expected = scalar_mean_field(crf, logits, image, 2.5, 4.0, compat, 2)
    assert torch.equal(crf(logits, image).detach(), expected)
    # nested, as in a LightningModule's checkpoint, and in float64
    model = torch.nn.Sequential(DenseCRF(3, trainable=True)).double()
    model.load_state_dict({f"0.{k}": v.double() for k, v in old.items()})
    assert model[0].spatial_weight.dtype == torch.float64
    torch.testing.assert_close(model[0].bilateral_weight.detach(), 4.0 * torch.eye(3).double())


def test_init_from_an_old_crf_checkpoint_keeps_its_kernel_weights(tmp_path):
    from dilatedseg.module import SegmentationModule

    def crf_stage():
        return SegmentationModule(3, stage="crf", arch="tiny", padding="same", crf="rnn")

    state = crf_stage().state_dict()
    state["model.crf.spatial_weight"] = torch.tensor(2.5)  # saved before they became C x C
    torch.save({"state_dict": state}, tmp_path / "old.ckpt")
    module = crf_stage()
    module.load_weights(str(tmp_path / "old.ckpt"))
    torch.testing.assert_close(module.model.crf.spatial_weight.detach(), 2.5 * torch.eye(3))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resuming_an_old_crf_checkpoint_expands_its_optimizer_state(optimizer):
    """Resuming a CRF-RNN run saved with scalar kernel weights: the optimiser's scalar
    momentum / averages of them become C x C too (else the first step fails)."""
    from dilatedseg.module import SegmentationModule

    def crf_stage():
        return SegmentationModule(3, stage="crf", arch="tiny", padding="same", crf="rnn",
                                  optimizer=optimizer, lr_schedule="constant")

    def optimiser(module):
        kind = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
        extra = {"momentum": 0.9} if optimizer == "sgd" else {}
        return kind(module.parameter_groups(), lr=0.01, **extra)

    # An old run's checkpoint: scalar weights, the optimiser's state of scalars.
    old = crf_stage()
    with torch.no_grad():
        for name in ("spatial_weight", "bilateral_weight"):
            setattr(old.model.crf, name, torch.nn.Parameter(torch.tensor(2.0)))
    old_optimiser = optimiser(old)
    sum(p.sum() for p in old.parameters()).backward()
    old_optimiser.step()
    checkpoint = {"state_dict": old.state_dict(),
                  "optimizer_states": [old_optimiser.state_dict()]}
    module = crf_stage()
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    resumed = optimiser(module)
    resumed.load_state_dict(checkpoint["optimizer_states"][0])
    sum(p.sum() for p in module.parameters()).backward()
    resumed.step()  # failed with "output with shape [] doesn't match the broadcast shape"
    assert module.model.crf.spatial_weight.shape == (3, 3)


def test_frozen_trainable_crf_runs():
    logits, image, _ = two_regions(10, 12)
    crf = DenseCRF(2, trainable=True).eval()
    expected = crf(logits, image).detach()
    crf.requires_grad_(False)
    torch.testing.assert_close(crf(logits, image), expected)


def test_fixed_potts_shortcut_matches_general_path():
    logits, image, _ = two_regions(10, 12)
    fixed = DenseCRF(2, spatial_weight=2.0, bilateral_weight=4.0).eval()
    general = DenseCRF(2, spatial_weight=2.0, bilateral_weight=4.0, trainable=True).eval()
    torch.testing.assert_close(fixed(logits, image), general(logits, image).detach())


def test_fixed_crf_has_no_parameters_but_moves_with_module():
    crf = DenseCRF(3)
    assert list(crf.parameters()) == []
    # Its constants come from the constructor, so checkpoints without a CRF still load.
    assert set(crf.state_dict()) == set()
    assert {name for name, _ in crf.named_buffers()} == {
        "spatial_weight", "bilateral_weight", "compatibility"}
    torch.testing.assert_close(crf.compatibility, -torch.eye(3))
    assert crf.double().compatibility.dtype == torch.float64


def test_gradcheck_through_mean_field():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    image = (torch.rand(1, 3, 4, 5) * 255).round().double()
    crf = DenseCRF(3, iterations=2, trainable=True, theta_alpha=3.0, theta_beta=30.0).double()
    assert torch.autograd.gradcheck(lambda u: crf(u, image), (logits,))
    # w.r.t. the (C, C) kernel weights and compatibility, away from their diagonal start
    names = ("spatial_weight", "bilateral_weight", "compatibility")
    params = tuple((getattr(crf, n).detach() + 0.3 * torch.randn(3, 3, dtype=torch.float64))
                   .requires_grad_(True) for n in names)

    def with_params(*values):
        return torch.func.functional_call(crf, dict(zip(names, values)), (logits.detach(), image))

    assert torch.autograd.gradcheck(with_params, params)


def test_eval_mode_uses_test_iterations():
    logits, image, _ = two_regions(10, 12)
    a = DenseCRF(2, iterations=1, test_iterations=3)
    b = DenseCRF(2, iterations=3, test_iterations=1)
    torch.testing.assert_close(a.eval()(logits, image), b.train()(logits, image))
    torch.testing.assert_close(a.train()(logits, image), b.eval()(logits, image))
    assert not torch.allclose(a.eval()(logits, image), a.train()(logits, image))
    zero = DenseCRF(2, iterations=0, test_iterations=0)
    torch.testing.assert_close(zero(logits, image), logits)


def test_autocast_computes_in_float32():
    logits, image, _ = two_regions(10, 12)
    crf = DenseCRF(2).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crf(logits.bfloat16(), image)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, crf(logits.bfloat16().float(), image))


def dense_mean_field(logits, image, theta_alpha, theta_beta, theta_gamma, ws, wb, iterations):
    """Krähenbühl & Koltun's mean field with exact (O(N^2)) Gaussian kernels, each with its
    self-term and normalised by its row sum, Potts compatibility; batch of one, float64."""
    c, h, w = logits.shape[1:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64),
                            torch.arange(w, dtype=torch.float64), indexing="ij")
    position = torch.stack([xs.flatten(), ys.flatten()], 1)
    colour = image[0].double().reshape(3, -1).t()

    def kernel(features):
        k = torch.exp(-0.5 * torch.cdist(features, features) ** 2)
        return k / k.sum(1, keepdim=True)

    spatial = kernel(position / theta_gamma)
    bilateral = kernel(torch.cat([position / theta_alpha, colour / theta_beta], 1))
    unary = logits[0].double().reshape(c, -1).t()
    x = unary
    for _ in range(iterations):
        q = x.softmax(1)
        x = unary + ws * spatial @ q + wb * bilateral @ q
    return x.t().reshape(1, c, h, w)


def test_fixed_crf_equals_dense_mean_field_with_its_kernel_widths_and_weights():
    """Each theta and weight in its place (no pydensecrf needed): swapping the spatial and
    bilateral position widths, or the two weights, triples the error or worse; what remains is
    the lattice's approximation of the Gaussians."""
    g = torch.Generator().manual_seed(0)
    ys, xs = torch.meshgrid(torch.arange(20.0), torch.arange(24.0), indexing="ij")
    image = torch.stack([xs * 10, ys * 12, 120 + 100 * torch.sin(xs / 3 + ys / 5)])[None].round()
    logits = 2 * torch.randn(1, 3, 20, 24, generator=g)
    expected = dense_mean_field(logits, image, 10.0, 40.0, 1.5, 1.0, 6.0, iterations=2)
    crf = DenseCRF(3, test_iterations=2, theta_alpha=10.0, theta_beta=40.0, theta_gamma=1.5,
                   spatial_weight=1.0, bilateral_weight=6.0).eval()
    with torch.no_grad():
        refined = crf(logits, image).double()
    message = (expected - logits).abs()  # what the CRF adds to the unary
    error = (refined - expected).abs()
    assert error.mean() < 0.03 * message.mean() and error.max() < 0.15 * message.max()


def test_agrees_with_pydensecrf():
    dcrf = pytest.importorskip("pydensecrf.densecrf")
    import numpy as np

    logits, image, _ = blob_scene()
    _, c, h, w = logits.shape
    crf = DenseCRF(c, test_iterations=10, theta_alpha=20.0, theta_beta=13.0).eval()
    with torch.no_grad():
        ours = torch.softmax(crf(logits, image), 1)[0].reshape(c, -1).numpy()

    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(-logits[0].reshape(c, -1).numpy()))
    d.addPairwiseGaussian(sxy=3.0, compat=3.0, kernel=dcrf.DIAG_KERNEL,
                          normalization=dcrf.NORMALIZE_AFTER)
    rgb = np.ascontiguousarray(image[0].permute(1, 2, 0).numpy().astype(np.uint8))
    d.addPairwiseBilateral(sxy=20.0, srgb=13.0, rgbim=rgb, compat=5.0,
                           kernel=dcrf.DIAG_KERNEL, normalization=dcrf.NORMALIZE_AFTER)
    ref = np.array(d.inference(10))

    agreement = (ours.argmax(0) == ref.argmax(0)).mean()
    assert agreement >= 0.99
    assert np.abs(ours - ref).max() < 1e-3
    # and the CRF actually changed the labelling
    assert (ref.argmax(0) != logits[0].reshape(c, -1).argmax(0).numpy()).mean() > 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    logits, image, _ = blob_scene(30, 40)
    crf = DenseCRF(5).eval()
    cpu = crf(logits, image)
    gpu = crf.cuda()(logits.cuda(), image.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-3, atol=1e-3)
