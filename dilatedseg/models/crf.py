"""Fully connected CRF with Gaussian edge potentials: mean-field inference in pure PyTorch.

Fixed parameters give Krähenbühl & Koltun's dense CRF as post-processing (the numbers agree
with pydensecrf, NORMALIZE_AFTER); trainable parameters give CRF-RNN (Zheng et al. 2015), the
mean-field iterations unrolled as layers with gradients to the logits and the CRF parameters.

Conventions (those of both reference implementations): the kernels include the self-term, each
is normalised by its response to a constant image, and with compatibility matrix mu one
iteration is  logits <- U - mu @ (W_s K_s Q + W_b K_b Q),  Q = softmax(logits), with (C, C)
kernel weights W_s, W_b (CRF-RNN's spatial_ker_weights and bilateral_ker_weights, learned from
w_s * I and w_b * I) or scalars w_s, w_b (the fixed CRF). The Potts model is mu = -I, so a
positive weight pulls a pixel towards the labels of similar pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dilatedseg.models.lattice import PermutohedralLattice

__all__ = ["DenseCRF"]


class DenseCRF(nn.Module):
    """Mean-field dense CRF over per-pixel logits.

    forward(logits (B, C, H, W), image (B, 3, H, W) RGB in 0-255) -> refined logits
    (B, C, H, W), the unnormalised log-marginals of the last iteration. Kernel widths are in
    pixels of the given image (theta_alpha, theta_beta: bilateral position and colour widths;
    theta_gamma: spatial width). `iterations` are used in training mode, `test_iterations` in
    eval mode. With `trainable=True` the C x C kernel weights (initialised to spatial_weight * I
    and bilateral_weight * I) and the C x C compatibility matrix are parameters (CRF-RNN);
    otherwise the kernel weights are scalars and all three are buffers.
    """

    def __init__(
        self,
        num_classes: int,
        iterations: int = 5,
        test_iterations: int = 10,
        trainable: bool = False,
        theta_alpha: float = 160.0,
        theta_beta: float = 3.0,
        theta_gamma: float = 3.0,
        spatial_weight: float = 3.0,
        bilateral_weight: float = 5.0,
        compatibility: str | Tensor = "potts",
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if iterations < 0 or test_iterations < 0:
            raise ValueError("iterations and test_iterations must be >= 0")
        if min(theta_alpha, theta_beta, theta_gamma) <= 0:
            raise ValueError("kernel widths theta_* must be positive")
        self.num_classes = num_classes
        self.iterations = iterations
        self.test_iterations = test_iterations
        self.trainable = trainable
        self.theta_alpha = float(theta_alpha)
        self.theta_beta = float(theta_beta)
        self.theta_gamma = float(theta_gamma)

        if isinstance(compatibility, str):
            if compatibility != "potts":
                raise ValueError(f"compatibility: 'potts' or a (C, C) matrix, not {compatibility}")
            compat = -torch.eye(num_classes)
        else:
            compat = torch.as_tensor(compatibility, dtype=torch.float32).clone()
            if compat.shape != (num_classes, num_classes):
                raise ValueError(
                    f"compatibility must be ({num_classes}, {num_classes}), "
                    f"got {tuple(compat.shape)}"
                )

        def kernel_weight(w: float) -> Tensor:  # CRF-RNN learns a C x C matrix from w * I
            return float(w) * torch.eye(num_classes) if trainable else torch.tensor(float(w))

        weights = {
            "spatial_weight": kernel_weight(spatial_weight),
            "bilateral_weight": kernel_weight(bilateral_weight),
            "compatibility": compat,
        }
        for name, value in weights.items():
            if trainable:
                self.register_parameter(name, nn.Parameter(value))
            else:  # fixed: set by the constructor's arguments, not saved in checkpoints
                self.register_buffer(name, value, persistent=False)

    def upgrade_state_dict(self, state_dict: dict, prefix: str = "") -> None:
        """In place: checkpoints written before the CRF-RNN's kernel weights became matrices
        hold scalars w, which become w * I."""
        for name in ("spatial_weight", "bilateral_weight"):
            value = state_dict.get(prefix + name)
            if self.trainable and value is not None and value.dim() == 0:
                state_dict[prefix + name] = value * torch.eye(
                    self.num_classes, dtype=value.dtype, device=value.device)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.upgrade_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, iterations={self.iterations}, "
            f"test_iterations={self.test_iterations}, trainable={self.trainable}, "
            f"theta_alpha={self.theta_alpha}, theta_beta={self.theta_beta}, "
            f"theta_gamma={self.theta_gamma}"
        )

    def forward(self, logits: Tensor, image: Tensor) -> Tensor:
        self._check_inputs(logits, image)
        iterations = self.iterations if self.training else self.test_iterations
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, image = logits.to(dtype), image.to(dtype)
            refined = [self._mean_field(u, im, iterations) for u, im in zip(logits, image)]
        return torch.stack(refined)

    def _check_inputs(self, logits: Tensor, image: Tensor) -> None:
        if not isinstance(logits, Tensor) or not isinstance(image, Tensor):
            raise ValueError("logits and image must be tensors")
        if logits.dim() != 4 or image.dim() != 4:
            raise ValueError(
                f"expected logits (B, C, H, W) and image (B, 3, H, W), got shapes "
                f"{tuple(logits.shape)} and {tuple(image.shape)}"
            )
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[1]} channels, the CRF has {self.num_classes} classes"
            )
        if image.shape[1] != 3:
            raise ValueError(f"image must have 3 (RGB) channels, got {image.shape[1]}")
        if logits.shape[0] != image.shape[0]:
            raise ValueError(
                f"batch sizes differ: logits {logits.shape[0]}, image {image.shape[0]}"
            )
        if logits.shape[2:] != image.shape[2:]:
            raise ValueError(
                f"logits {tuple(logits.shape[2:])} and image {tuple(image.shape[2:])} differ in "
                "spatial size: upsample the logits to the image resolution first"
            )
        if logits.device != image.device:
            raise ValueError(f"logits on {logits.device}, image on {image.device}")
        if not torch.is_floating_point(logits):
            raise ValueError(f"logits must be floating point, got {logits.dtype}")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("logits contain NaN or Inf")
        if not bool(torch.isfinite(image.float()).all()):
            raise ValueError("image contains NaN or Inf")

    def lattices(self, image: Tensor) -> tuple[PermutohedralLattice, PermutohedralLattice]:
        """Spatial and bilateral lattices of one image (3, H, W) in 0-255."""
        _, h, w = image.shape
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=image.dtype, device=image.device),
            torch.arange(w, dtype=image.dtype, device=image.device),
            indexing="ij",
        )
        xs, ys = xs.reshape(-1, 1), ys.reshape(-1, 1)
        colour = image.detach().reshape(3, -1).t()
        spatial = torch.cat([xs / self.theta_gamma, ys / self.theta_gamma], 1)
        bilateral = torch.cat(
            [xs / self.theta_alpha, ys / self.theta_alpha, colour / self.theta_beta], 1
        )
        return PermutohedralLattice(spatial), PermutohedralLattice(bilateral)

    def _fixed_potts(self) -> bool:
        """Potts compatibility and scalar weights that need no gradient (post-processing)."""
        params = (self.spatial_weight, self.bilateral_weight, self.compatibility)
        if self.trainable or any(p.requires_grad for p in params):
            return False
        potts = -torch.eye(self.num_classes, dtype=params[2].dtype, device=params[2].device)
        return torch.equal(self.compatibility, potts)

    def _message_matrix(self, weight: Tensor, dtype: torch.dtype) -> Tensor:
        """-(mu W)^T for a (C, C) kernel weight W, or -(w mu)^T for a scalar w."""
        mu, weight = self.compatibility.to(dtype), weight.to(dtype)
        return -(mu @ weight if weight.dim() else weight * mu).t()

    def _mean_field(self, logits: Tensor, image: Tensor, iterations: int) -> Tensor:
        c, h, w = logits.shape
        unary = logits.reshape(c, h * w).t().contiguous()
        if iterations == 0:
            return logits.clone()
        spatial, bilateral = self.lattices(image)
        if self._fixed_potts():
            # mu = -I, fixed weights: U + w_s K_s Q + w_b K_b Q, no (C, C) products needed.
            ws, wb = float(self.spatial_weight), float(self.bilateral_weight)

            def update(fs: Tensor, fb: Tensor) -> Tensor:
                return torch.add(unary, fs, alpha=ws).add_(fb, alpha=wb)
        else:
            # U - mu (W_s K_s Q + W_b K_b Q) as two fused multiply-adds; the rows here are
            # pixels, so each kernel's (C, C) matrix is -(mu W)^T.
            ms = self._message_matrix(self.spatial_weight, unary.dtype)
            mb = self._message_matrix(self.bilateral_weight, unary.dtype)

            def update(fs: Tensor, fb: Tensor) -> Tensor:
                return torch.addmm(unary, fs, ms).addmm_(fb, mb)

        x = unary
        for _ in range(iterations):
            q = torch.softmax(x, 1)
            x = update(spatial.filter(q, normalize=True), bilateral.filter(q, normalize=True))
        return x.t().reshape(c, h, w)
