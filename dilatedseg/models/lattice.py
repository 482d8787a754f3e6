"""Permutohedral lattice (Adams, Baek & Davis 2010) for fast high-dimensional Gaussian filtering.

Pure PyTorch, device-agnostic and vectorised. The conventions follow Krähenbühl's dense-CRF code
(the code pydensecrf wraps), so that results agree with it to float precision: features are
pre-scaled by 1/theta, the blur along each of the d+1 lattice axes is [0.5, 1, 0.5], and the
sliced result is scaled by alpha = 1 / (1 + 2^-d). `filter` approximates
sum_j exp(-|f_i - f_j|^2 / 2) v_j, self-term included, up to a near-constant factor that
cancels when the result is normalised by the filtered ones (as the dense CRF does).

Splat, blurs and slice are sparse matrices built once per feature set: filtering an (N, C)
tensor is d+3 sparse-dense products, with memory linear in N.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

__all__ = ["PermutohedralLattice"]


def _csr(crow: Tensor, col: Tensor, val: Tensor, shape: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(crow, col, val, size=shape, check_invariants=False)


def _crow(counts: Tensor) -> Tensor:
    crow = counts.new_zeros(counts.numel() + 1)
    torch.cumsum(counts, 0, out=crow[1:])
    return crow


class PermutohedralLattice:
    """Lattice over points with features (N, d), already divided by the kernel widths.

    `filter(values)` with values (N, C) returns the filtered values (N, C). Build the lattice
    once and reuse it for any number of filterings (labels, mean-field iterations). Gradients
    w.r.t. the values are exact: the backward pass applies the true adjoint (slice^T, blurs in
    reverse order, splat^T); it is not the forward itself, as blurs along different lattice
    axes do not commute.
    """

    # Keys are packed into one int64 when the product of their ranges fits in this many bits.
    max_pack_bits = 62

    def __init__(self, features: Tensor):
        if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
            raise ValueError(f"features must be (N, d) with N, d > 0, got {tuple(features.shape)}")
        if not torch.is_floating_point(features):
            raise ValueError(f"features must be floating point, got {features.dtype}")
        if not torch.isfinite(features).all():
            raise ValueError("features must be finite")
        self.num_points, self.dim = features.shape
        self.device = features.device
        self.alpha = 1.0 / (1.0 + 2.0 ** (-self.dim))
        with torch.no_grad():
            self._build(*self._enclosing_simplices(features.detach()))
        self._cache: dict[torch.dtype, dict] = {}

    # ----------------------------------------------------------------------------- construction
    def _enclosing_simplices(self, f: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Remainder-0 point (d+1, N), rank (d+1, N) and barycentric weights (d+1, N).

        Vertex r of the simplex enclosing point n has coordinates
        rem0[:, n] + r - (d+1) * [rank[:, n] > d - r] (Adams et al., section 3).
        """
        n, d = f.shape
        dt = f.dtype
        f = f.t()
        inv_std = math.sqrt(2.0 / 3.0) * (d + 1)
        # Elevate onto the hyperplane x_0 + ... + x_d = 0 of R^{d+1}.
        elevated = f.new_empty(d + 1, n)
        sm = f.new_zeros(n)
        for j in range(d, 0, -1):
            cf = f[j - 1] * (inv_std / math.sqrt((j + 1) * j))
            elevated[j] = sm - j * cf
            sm = sm + cf
        elevated[0] = sm
        # Nearest remainder-0 lattice point (round half to even, as the SSE code does).
        down = torch.tensor(1.0 / (d + 1), dtype=dt, device=f.device)
        rounded = torch.round(elevated * down)
        rem0 = rounded * (d + 1)
        total = rounded.sum(0).long()
        # Rank of each coordinate of the residual (ties: the later coordinate ranks higher).
        diff = elevated - rem0
        rank = torch.zeros(d + 1, n, dtype=torch.long, device=f.device)
        for i in range(d):
            for j in range(i + 1, d + 1):
                less = (diff[i] < diff[j]).long()
                rank[i] += less
                rank[j] += 1 - less
        # Bring the point back onto the plane if the rounded point is off it.
        rank += total
        shift = (rank < 0).long() - (rank > d).long()
        rank += shift * (d + 1)
        rem0 = rem0.long() + shift * (d + 1)
        # Barycentric weights.
        v = (elevated - rem0.to(dt)) * down
        bary = f.new_zeros(d + 2, n)
        bary.scatter_add_(0, d - rank, v)
        bary.scatter_add_(0, d - rank + 1, -v)
        bary[0] += 1.0 + bary[d + 1]
        return rem0, rank, bary[: d + 1]

    def _build(self, rem0: Tensor, rank: Tensor, weights: Tensor) -> None:
        n, d, dev = self.num_points, self.dim, self.device
        # Vertex coordinates lie within rem0 -+ d, their blur neighbours within a further -+ d.
        lo = rem0[:d].amin(1) - (2 * d + 1)
        span = rem0[:d].amax(1) + (2 * d + 2) - lo
        if float(torch.log2(span.double()).sum()) < self.max_pack_bits:
            # Pack each vertex key into one int64, hash by sorting.
            strides = torch.ones(d, dtype=torch.long, device=dev)
            for i in range(d - 2, -1, -1):
                strides[i] = strides[i + 1] * span[i + 1]
            base = ((rem0[:d] - lo.view(-1, 1)) * strides.view(-1, 1)).sum(0)
            # by_rank[k] = sum of the strides of the coordinates of rank k
            by_rank = torch.zeros(d + 1, n, dtype=torch.long, device=dev)
            by_rank.scatter_add_(0, rank[:d], strides.view(-1, 1).expand(d, n))
            above = by_rank.flip(0).cumsum(0).flip(0)  # above[k] = sum over ranks >= k
            total = strides.sum()
            packed = torch.stack(
                [base + r * total - (d + 1) * above[d + 1 - r] if r > 0 else base
                 for r in range(d + 1)], 1).reshape(-1)  # point-major (N * (d+1),)
            sorted_keys, perm = torch.sort(packed, stable=True)
            first = torch.ones_like(sorted_keys, dtype=torch.bool)
            first[1:] = sorted_keys[1:] != sorted_keys[:-1]
            table = sorted_keys[first]
            ids_sorted = torch.cumsum(first, 0) - 1
            offsets = torch.empty_like(ids_sorted)
            offsets[perm] = ids_sorted
            m = table.numel()
            counts = torch.bincount(ids_sorted, minlength=m)
            steps = [(d + 1) * strides[j] - total if j < d else -total for j in range(d + 1)]
            neighbours = [(self._lookup(table, table + s), self._lookup(table, table - s))
                          for s in steps]
        else:  # keys too wide to pack into an int64: lexicographic unique, slower
            r = torch.arange(d + 1, device=dev).view(-1, 1, 1)
            keys = rem0[None, :d] + r - (d + 1) * (rank[None, :d] > d - r).long()
            flat = keys.permute(2, 0, 1).reshape(-1, d)
            table, offsets = torch.unique(flat, dim=0, return_inverse=True)
            m = table.shape[0]
            perm = torch.sort(offsets, stable=True)[1]
            counts = torch.bincount(offsets, minlength=m)
            neighbours = []
            for j in range(d + 1):
                step = torch.full((d,), -1, dtype=torch.long, device=dev)
                if j < d:
                    step[j] = d
                neighbours.append((self._lookup_rows(table, table + step),
                                   self._lookup_rows(table, table - step)))
        self.num_vertices = m
        index = torch.int32 if max(n * (d + 1), m) < 2**31 - 1 else torch.long
        weights = weights.t().reshape(-1)  # point-major, like `offsets`

        # Splat (M x N): the points of each vertex, in increasing point order.
        self._splat = (_crow(counts).to(index), (perm // (d + 1)).to(index), weights[perm])
        # Slice (N x M): the d+1 vertices of each point, sorted by vertex.
        cols, order = torch.sort(offsets.view(n, d + 1), dim=1)
        self._slice = (
            torch.arange(0, n * (d + 1) + 1, d + 1, device=dev).to(index),
            cols.reshape(-1).to(index),
            weights.view(n, d + 1).gather(1, order).reshape(-1) * self.alpha,
        )
        # Blur along axis j: B_j = I + (P_n1 + P_n2) / 2, a symmetric matrix.
        self._blurs = []
        self_ids = torch.arange(m, device=dev)
        for n1, n2 in neighbours:
            cols = torch.sort(torch.stack([n1, self_ids, n2], 1), dim=1)[0]
            vals = torch.where(cols == self_ids.view(-1, 1), 1.0, 0.5)
            keep = cols < m  # absent neighbours (index m) drop out
            crow = _crow(keep.sum(1))
            self._blurs.append((crow.to(index), cols[keep].to(index), vals[keep]))

    @staticmethod
    def _lookup(table: Tensor, query: Tensor) -> Tensor:
        """Position of each query in the sorted 1-D table, or len(table) if absent."""
        m = table.numel()
        pos = torch.searchsorted(table, query).clamp_(max=m - 1)
        return torch.where(table[pos] == query, pos, m)

    @staticmethod
    def _lookup_rows(table: Tensor, query: Tensor) -> Tensor:
        """Row of each query row in the lexicographically sorted unique table, or len(table)."""
        m = table.shape[0]
        _, inv = torch.unique(torch.cat([table, query]), dim=0, return_inverse=True)
        owner = torch.full((m + query.shape[0],), m, dtype=torch.long, device=table.device)
        owner[inv[:m]] = torch.arange(m, device=table.device)
        return owner[inv[m:]]

    # -------------------------------------------------------------------------------- filtering
    def _matrices(self, dtype: torch.dtype, normalize: bool) -> dict[str, Tensor]:
        """Splat, blurs and slice as CSR matrices of `dtype`, built on first use.

        With `normalize`, also "splat_norm" and "slice_norm": NORMALIZE_AFTER's division by
        the response to ones, folded into the slice rows (forward) or splat columns (adjoint).
        """
        n, m, d = self.num_points, self.num_vertices, self.dim
        if dtype not in self._cache:
            self._cache[dtype] = {
                "splat": _csr(*self._splat[:2], self._splat[2].to(dtype), (m, n)),
                "blurs": [_csr(c, k, v.to(dtype), (m, m)) for c, k, v in self._blurs],
                "slice": _csr(*self._slice[:2], self._slice[2].to(dtype), (n, m)),
            }
        mats = self._cache[dtype]
        if normalize and "slice_norm" not in mats:
            ones = torch.ones(n, 1, dtype=dtype, device=self.device)
            norm = 1.0 / (self._apply(ones, False, False).view(-1) + 1e-20)
            splat_val = mats["splat"].values() * norm[self._splat[1].long()]
            slice_val = mats["slice"].values() * norm.repeat_interleave(d + 1)
            mats["splat_norm"] = _csr(*self._splat[:2], splat_val, (m, n))
            mats["slice_norm"] = _csr(*self._slice[:2], slice_val, (n, m))
        return mats

    def _apply(self, values: Tensor, adjoint: bool, normalize: bool) -> Tensor:
        mats = self._matrices(values.dtype, normalize)
        splat, blurs, slice_ = mats["splat"], mats["blurs"], mats["slice"]
        if adjoint:  # (D S^T B S)^T = S^T B^T (S D), B^T = the blurs in reverse order
            blurs = blurs[::-1]
            splat = mats["splat_norm"] if normalize else splat
        elif normalize:
            slice_ = mats["slice_norm"]
        x = _spmm(splat, values)
        for blur in blurs:
            x = _spmm(blur, x)
        return _spmm(slice_, x)

    def _check(self, values: Tensor) -> Tensor:
        if values.dim() != 2 or values.shape[0] != self.num_points:
            raise ValueError(
                f"values must be (N={self.num_points}, C), got {tuple(values.shape)}"
            )
        if values.device != self.device:
            raise ValueError(f"values on {values.device}, lattice on {self.device}")
        if not torch.is_floating_point(values):
            values = values.float()
        return values.contiguous()

    def filter(self, values: Tensor, normalize: bool = False) -> Tensor:
        """Gaussian-filter values (N, C); differentiable w.r.t. the values.

        With `normalize`, divide by the filter response to ones (pydensecrf NORMALIZE_AFTER,
        the row normalisation of CRF-RNN).
        """
        return _LatticeFilter.apply(self._check(values), self, False, normalize)

    def filter_adjoint(self, values: Tensor, normalize: bool = False) -> Tensor:
        """The adjoint (transpose) of `filter`: blurs in reverse order."""
        return _LatticeFilter.apply(self._check(values), self, True, normalize)


def _spmm(a: Tensor, x: Tensor) -> Tensor:
    """Sparse @ dense. In place with beta=0, this skips the zero-fill and the copy of the
    output that `a @ x` costs on CPU (beta=0 ignores the uninitialised buffer)."""
    shape = (a.shape[0], x.shape[1])
    out = x.new_empty(shape) if x.device.type == "cpu" else x.new_zeros(shape)
    return out.addmm_(a, x, beta=0)


class _LatticeFilter(torch.autograd.Function):
    """values -> lattice filter (or its adjoint); backward applies the other one."""

    @staticmethod
    def forward(ctx, values, lattice, adjoint: bool, normalize: bool) -> Tensor:
        ctx.lattice, ctx.adjoint, ctx.normalize = lattice, adjoint, normalize
        return lattice._apply(values, adjoint, normalize)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = _LatticeFilter.apply(grad.contiguous(), ctx.lattice, not ctx.adjoint, ctx.normalize)
        return grad, None, None, None
