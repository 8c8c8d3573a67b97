"""Supervised contrastive learning, the L_out loss (Khosla et al. 2020)."""

from __future__ import annotations

import torch
from torch import nn

from orchestrator.distributed import gather
from plugins.losses.multiview import gather_views, multi_positive_nce, positive_similarity
from plugins.losses.views import simclr_views


class SupCon(nn.Module):
    """Supervised contrastive loss over augmented views: every view of the same class is a positive.

    Khosla et al. 2020, "Supervised Contrastive Learning", equation 2 (L_out, the better of its two forms):
    ``L = sum_i -1/|P(i)| sum_{p in P(i)} log exp(z_i . z_p / t) / sum_{a != i} exp(z_i . z_a / t)``, over every
    view i of the global batch, P(i) the other views whose image has i's label; averaged over the anchors.
    ``temperature`` 0.1 as in the paper (section 4); the views are SimCLR's augmentation (the paper's
    AutoAugment alternative is not used); ``n_views`` views per image (2 in the paper).
    """

    def __init__(self, temperature: float = 0.1, n_views: int = 2, crop_scale: tuple[float, float] = (0.08, 1.0),
                 flip: bool = True, color: float | None = None, blur: float | None = None) -> None:
        super().__init__()
        if temperature <= 0 or n_views < 2:
            raise ValueError("temperature must be positive and n_views at least 2")
        self.temperature = temperature
        self.views = simclr_views(n_views, crop_scale, flip, color, blur)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        views = batch["views"]
        with torch.autocast(views[0].device.type, enabled=False):
            z, local = gather_views(views)
            labels = gather(batch["label"].to(z.device))
            loss = multi_positive_nce(z, local, labels, self.temperature)
        return {"loss": loss, "pos_sim": positive_similarity(z, local)}
