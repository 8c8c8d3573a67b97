"""VICReg: variance-invariance-covariance regularisation (Bardes et al. 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plugins.losses.heads import mlp, width
from plugins.losses.multiview import gather_views
from plugins.losses.views import simclr_views


class VICReg(nn.Module):
    """Invariance between two views plus variance and covariance terms over the global batch, exact across ranks.

    Bardes et al. 2022, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning"
    (ICLR): ``L = sim_coeff * MSE(Z, Z') + std_coeff * (v(Z) + v(Z')) / 2 + cov_coeff * (c(Z) + c(Z'))`` with
    ``v(Z) = mean_j relu(gamma - sqrt(Var(z_j) + eps))`` and ``c(Z) = sum_{i != j} Cov(Z)_ij^2 / d``, the
    statistics over the GLOBAL batch (unbiased, as the authors' code after its all-gather). ``sim_coeff`` 25,
    ``std_coeff`` 25, ``cov_coeff`` 1, ``gamma`` 1 and ``eps`` 1e-4 as in the paper. Z is the encoder's output
    through the loss's expander (built in ``bind``): linear layers of widths ``projector`` with batch norm
    (global) and ReLU between them, as the paper's; the encoder's output is the representation that is
    evaluated. The paper's expander is 8192-8192-8192; the default here is 1024 wide (see ``barlow-twins``);
    ``projector=[]`` puts the loss on the encoder's output, which on MNIST leaves kNN accuracy below the
    untrained encoder's (45.7% against 55.5%, default run). The views are SimCLR's augmentation (the paper
    uses BYOL's asymmetric recipe).
    """

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0, gamma: float = 1.0,
                 eps: float = 1e-4, projector: tuple[int, ...] = (1024, 1024, 1024),
                 crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True, color: float | None = None,
                 blur: float | None = None) -> None:
        super().__init__()
        if eps <= 0:
            raise ValueError("eps must be positive")
        self.sim_coeff, self.std_coeff, self.cov_coeff = sim_coeff, std_coeff, cov_coeff
        self.gamma, self.eps, self.widths = gamma, eps, tuple(projector)
        self.projector: nn.Module | None = None if self.widths else nn.Identity()
        self.views = simclr_views(2, crop_scale, flip, color, blur)

    def bind(self, encoder: nn.Module) -> None:
        """Build the expander for the encoder's width."""
        if self.widths:
            self.projector = mlp([width(encoder), *self.widths])

    def forward(self, batch: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        if self.projector is None:
            raise RuntimeError("bind(encoder) builds the expander before the first forward")
        views = [self.projector(v) for v in batch["views"]]
        with torch.autocast(views[0].device.type, enabled=False):
            z, _ = gather_views(views, normalize=False)
            _, n, d = z.shape
            invariance = F.mse_loss(z[0], z[1])
            z = z - z.mean(dim=1, keepdim=True)
            variance = F.relu(self.gamma - torch.sqrt(z.var(dim=1) + self.eps)).mean()  # both views averaged
            cov = z.transpose(1, 2) @ z / (n - 1)  # [2, d, d]
            covariance = (cov.pow(2).sum() - cov.diagonal(dim1=1, dim2=2).pow(2).sum()) / d
            loss = self.sim_coeff * invariance + self.std_coeff * variance + self.cov_coeff * covariance
        return {"loss": loss, "invariance": invariance.detach(), "variance": variance.detach(),
                "covariance": covariance.detach()}
