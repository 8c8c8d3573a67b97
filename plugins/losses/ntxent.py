"""SimCLR's NT-Xent over augmented views of each image (Chen et al. 2020)."""

from __future__ import annotations

import torch
from torch import nn

from plugins.losses.multiview import gather_views, multi_positive_nce, positive_similarity
from plugins.losses.views import simclr_views


class NTXent(nn.Module):
    """SimCLR's normalized temperature-scaled cross entropy between views of each image, exact across ranks.

    Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations". Each view
    z_i is scored against the 2N - 1 other views of the global batch (its positive and the 2N - 2 views of
    other images, same-view ones included): ``l_ij = -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t)`` with
    cosine similarities s, averaged over the 2N anchors. ``n_views`` > 2 averages over every other view of
    the same image as positive (the SupCon L_out form with the image as label). ``temperature`` 0.1 is the
    paper's ImageNet choice (Table 5) and its code's default; 0.5, its CIFAR-10 optimum after 1000 epochs,
    leaves the default 500-step MNIST run at its initial kNN accuracy (57.3% against 55.5%; 0.1 gives 67.6%).
    The views are the paper's augmentation (appendix A; ``simclr_views``), with its CIFAR-10 colour and blur
    on small images.
    """

    def __init__(self, temperature: float = 0.1, n_views: int = 2, crop_scale: tuple[float, float] = (0.08, 1.0),
                 flip: bool = True, color: float | None = None, blur: float | None = None) -> None:
        super().__init__()
        if temperature <= 0 or n_views < 2:
            raise ValueError("temperature must be positive and n_views at least 2")
        self.temperature = temperature
        self.views = simclr_views(n_views, crop_scale, flip, color, blur)

    def forward(self, batch: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        views = batch["views"]
        with torch.autocast(views[0].device.type, enabled=False):
            z, local = gather_views(views)
            targets = torch.arange(z.shape[1], device=z.device)  # the positives are the image's other views
            loss = multi_positive_nce(z, local, targets, self.temperature)
        return {"loss": loss, "pos_sim": positive_similarity(z, local)}
