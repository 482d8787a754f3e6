"""Permutohedral lattice: accuracy against a dense O(N^2) Gaussian filter, exact adjoint."""

from __future__ import annotations

import pytest
import torch

from dilatedseg.models.lattice import PermutohedralLattice

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_filter(features: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Dense normalised Gaussian filter: sum_j k_ij v_j / sum_j k_ij, k_ij = exp(-|f_i-f_j|^2/2)."""
    kernel = torch.exp(-0.5 * torch.cdist(features, features) ** 2)
    return kernel @ values / kernel.sum(1, keepdim=True)


def grid(h: int, w: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij"
    )
    return xs, ys


def smooth_scene(h: int = 16, w: int = 20):
    """Features of a smooth synthetic image and a few smooth/step signals on it."""
    xs, ys = grid(h, w)
    colour = torch.stack([xs * 8, ys * 10, 128 + 60 * torch.sin(xs / 4)]).reshape(3, -1).t()
    values = torch.stack([torch.sin(xs / 3) + ys / 10, torch.cos(ys / 4), (xs > 10).double()], -1)
    position = torch.stack([xs, ys], -1).reshape(-1, 2)
    return position, colour, values.reshape(-1, 3)


@pytest.mark.parametrize(
    "kind, theta_xy, theta_rgb", [("spatial", 3.0, None), ("spatial", 1.5, None),
                                  ("bilateral", 5.0, 20.0)]
)
def test_matches_dense_gaussian(kind, theta_xy, theta_rgb):
    position, colour, values = smooth_scene()
    features = position / theta_xy
    if kind == "bilateral":
        features = torch.cat([features, colour / theta_rgb], 1)
    out = PermutohedralLattice(features).filter(values, normalize=True)
    ref = naive_filter(features, values)
    value_range = ref.amax(0) - ref.amin(0)
    err = (out - ref).abs()
    # The lattice is an approximation (its kernel is slightly wider than the Gaussian).
    assert (err.amax(0) / value_range).max() < 0.08
    assert (err.mean(0) / value_range).max() < 0.01


def test_unnormalised_response_is_a_near_constant_multiple():
    position, _, _ = smooth_scene(20, 24)
    features = position / 2.0
    ones = torch.ones(features.shape[0], 1, dtype=torch.float64)
    ratio = PermutohedralLattice(features).filter(ones) / (
        torch.exp(-0.5 * torch.cdist(features, features) ** 2).sum(1, keepdim=True)
    )
    assert ratio.std() / ratio.mean() < 0.05


def test_constant_signal_is_preserved_when_normalised():
    position, colour, _ = smooth_scene()
    lattice = PermutohedralLattice(torch.cat([position / 4, colour / 15], 1))
    values = torch.full((position.shape[0], 2), 3.5, dtype=torch.float64)
    torch.testing.assert_close(lattice.filter(values, normalize=True), values)


def test_gradcheck_adjoint_float64():
    torch.manual_seed(0)
    xs, ys = grid(6, 5)
    colour = torch.rand(30, 3, dtype=torch.float64) * 255
    features = torch.cat([torch.stack([xs, ys], -1).reshape(-1, 2) / 2, colour / 40], 1)
    lattice = PermutohedralLattice(features)
    values = torch.rand(30, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lattice.filter, (values,))
    assert torch.autograd.gradcheck(lambda v: lattice.filter(v, normalize=True), (values,))
    assert torch.autograd.gradgradcheck(lattice.filter, (values,))


def test_adjoint_dot_product_identity():
    torch.manual_seed(1)
    features = torch.rand(200, 4, dtype=torch.float64) * 5
    lattice = PermutohedralLattice(features)
    u = torch.randn(200, 3, dtype=torch.float64)
    w = torch.randn(200, 3, dtype=torch.float64)
    for normalize in (False, True):
        lhs = (lattice.filter(u, normalize=normalize) * w).sum()
        rhs = (u * lattice.filter_adjoint(w, normalize=normalize)).sum()
        torch.testing.assert_close(lhs, rhs)


def test_float32_and_float64_agree():
    position, colour, values = smooth_scene()
    features = torch.cat([position / 5, colour / 20], 1)
    out64 = PermutohedralLattice(features).filter(values)
    out32 = PermutohedralLattice(features.float()).filter(values.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-4, atol=1e-5)


def test_wide_keys_fallback_matches_packed(monkeypatch):
    torch.manual_seed(2)
    features = torch.rand(300, 5, dtype=torch.float64) * 6
    values = torch.randn(300, 2, dtype=torch.float64)
    packed = PermutohedralLattice(features)
    monkeypatch.setattr(PermutohedralLattice, "max_pack_bits", 0)
    generic = PermutohedralLattice(features)
    assert generic.num_vertices == packed.num_vertices
    torch.testing.assert_close(generic.filter(values), packed.filter(values))


def test_lattice_reused_across_calls_and_channels():
    position, _, values = smooth_scene()
    lattice = PermutohedralLattice(position / 3)
    both = lattice.filter(values)
    one = lattice.filter(values[:, :1])
    torch.testing.assert_close(both[:, :1], one)


def test_bad_input():
    with pytest.raises(ValueError, match=r"features must be \(N, d\)"):
        PermutohedralLattice(torch.rand(10))
    with pytest.raises(ValueError, match="features must be finite"):
        PermutohedralLattice(torch.tensor([[0.0, float("nan")]]))
    lattice = PermutohedralLattice(torch.rand(10, 2))
    with pytest.raises(ValueError, match=r"values must be \(N=10, C\), got \(9, 2\)"):
        lattice.filter(torch.rand(9, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    position, colour, values = smooth_scene()
    features = torch.cat([position / 5, colour / 20], 1).float()
    cpu = PermutohedralLattice(features).filter(values.float(), normalize=True)
    gpu = PermutohedralLattice(features.cuda()).filter(values.float().cuda(), normalize=True)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-5)
