"""Alignment and uniformity on the hypersphere (Wang & Isola 2020)."""

from __future__ import annotations

import math

import torch
from torch import nn

from plugins.losses.multiview import gather_views
from plugins.losses.views import simclr_views


class AlignUniform(nn.Module):
    """Alignment of two views of each image plus uniformity of the embeddings, exact across ranks.

    Wang & Isola 2020, "Understanding Contrastive Representation Learning through Alignment and Uniformity
    on the Hypersphere": ``L = align_weight * E ||f(x) - f(y)||^alpha + unif_weight * (U(f(x)) + U(f(y))) / 2``
    with ``U(f) = log E_{i != j} exp(-t ||f_i - f_j||^2)`` over the pairs of the global batch and f the
    L2-normalised embeddings. ``alpha`` 2, ``t`` 2 and unit weights as in the paper and the authors' code;
    the views are SimCLR's augmentation (two views, as the paper).
    """

    def __init__(self, alpha: float = 2.0, t: float = 2.0, align_weight: float = 1.0, unif_weight: float = 1.0,
                 crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True, color: float | None = None,
                 blur: float | None = None) -> None:
        super().__init__()
        if alpha <= 0 or t <= 0:
            raise ValueError("alpha and t must be positive")
        self.alpha, self.t, self.align_weight, self.unif_weight = alpha, t, align_weight, unif_weight
        self.views = simclr_views(2, crop_scale, flip, color, blur)

    def forward(self, batch: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        views = batch["views"]
        with torch.autocast(views[0].device.type, enabled=False):
            z, local = gather_views(views)
            align = (z[0, local] - z[1, local]).pow(2).sum(dim=-1).pow(self.alpha / 2).mean()
            n = z.shape[1]
            i, j = torch.triu_indices(n, n, offset=1, device=z.device)
            sq_dist = (z[:, i] - z[:, j]).pow(2).sum(dim=-1)  # [2, pairs]
            uniform = (torch.logsumexp(-self.t * sq_dist, dim=1) - math.log(i.numel())).mean()
            loss = self.align_weight * align + self.unif_weight * uniform
        return {"loss": loss, "align": align.detach(), "uniform": uniform.detach()}
