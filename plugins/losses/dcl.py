"""Decoupled contrastive learning, DCL and its weighted form DCLW (Yeh et al. 2022)."""

from __future__ import annotations

import torch
from torch import nn

from plugins.losses.multiview import anchor_logits, gather_views, positive_similarity
from plugins.losses.views import simclr_views


class DCL(nn.Module):
    """NT-Xent with the positive removed from the denominator (decoupled contrastive loss), exact across ranks.

    Yeh et al. 2022, "Decoupled Contrastive Learning" (ECCV): for each view z_i and each other view
    z_p of the same image, ``L = -s_ip / t + log sum_{k in N(i)} exp(s_ik / t)`` with cosine similarities s and
    N(i) every view of the other images of the global batch (the 2N - 2 negatives); averaged over anchors and
    positives (the reference code sums the two directions of a pair: twice this). ``temperature`` 0.1 as in
    the authors' code; the views are SimCLR's augmentation; ``n_views`` views per image (2 in the paper).
    """

    def __init__(self, temperature: float = 0.1, n_views: int = 2, crop_scale: tuple[float, float] = (0.08, 1.0),
                 flip: bool = True, color: float | None = None, blur: float | None = None) -> None:
        super().__init__()
        if temperature <= 0 or n_views < 2:
            raise ValueError("temperature must be positive and n_views at least 2")
        self.temperature = temperature
        self.sigma: float | None = None  # DCLW's weighting
        self.views = simclr_views(n_views, crop_scale, flip, color, blur)

    def forward(self, batch: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        views = batch["views"]
        with torch.autocast(views[0].device.type, enabled=False):
            z, local = gather_views(views)
            v, n, _ = z.shape
            logits, _ = anchor_logits(z, local, self.temperature)
            ids = torch.arange(n, device=z.device)
            same_image = ids[local].repeat(v)[:, None] == ids.repeat(v)[None, :]
            negatives = logits.masked_fill(same_image, float("-inf")).logsumexp(dim=1).view(v, -1)  # [V, B]
            sims = torch.einsum("vnd,wnd->vwn", z, z)  # [V, V, N]: view v against view w of each global image
            weight = 1.0 if self.sigma is None else 2 - n * (sims / self.sigma).softmax(dim=-1)[:, :, local]
            terms = -weight * sims[:, :, local] / self.temperature + negatives[:, None, :]
            loss = terms[~torch.eye(v, dtype=torch.bool, device=z.device)].mean()
        return {"loss": loss, "pos_sim": positive_similarity(z, local)}


class DCLW(DCL):
    """DCL with the positive term weighted by a negative von Mises-Fisher weight (DCLW), exact across ranks.

    Yeh et al. 2022, "Decoupled Contrastive Learning": the positive term of DCL is multiplied by
    ``w_i = 2 - N exp(s_ii' / sigma) / sum_j exp(s_jj' / sigma)`` over the N images of the global batch, which
    weights the harder (less similar) positive pairs more; ``sigma`` 0.5 and ``temperature`` 0.1 as in the
    paper and the authors' code. The other options are DCL's.
    """

    def __init__(self, sigma: float = 0.5, temperature: float = 0.1, n_views: int = 2,
                 crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True, color: float | None = None,
                 blur: float | None = None) -> None:
        super().__init__(temperature, n_views, crop_scale, flip, color, blur)
        if sigma <= 0:
            raise ValueError("sigma must be positive")
        self.sigma = sigma
