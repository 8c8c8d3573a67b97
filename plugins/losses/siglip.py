"""The pairwise sigmoid image-text loss of SigLIP (Zhai et al. 2023)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.distributed import gather_with_grad, rank
from plugins.losses.options import check_tile
from plugins.losses.tiles import reduce_rows


class SigLIP(nn.Module):
    """Pairwise sigmoid image-text loss with a learnable temperature and bias (SigLIP), exact across ranks.

    Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training": every image-text pair is an
    independent binary problem, ``-1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b))`` with ``z_ij = +1`` for
    the matching pair and -1 otherwise, ``t = exp(t')`` from ``t' = ln(init_scale)`` and ``b`` from
    ``init_bias`` (the paper's 10 and -10, which keep the many negatives from dominating the first steps).
    Each rank scores its B local images against the texts of every rank (gathered with gradients) and
    divides by its local B: the mean over ranks then equals the loss of one batch of B x world divided by
    B x world. The paper's chunked ring (texts passed between neighbours, one block at a time) computes the
    same sum with less memory; this is the all-gather form of it, and ``tile`` > 0 bounds its memory the
    other way: that many rows of the B x (B x world) logits at a time (``tiles.py``), same loss and gradients.
    """

    def __init__(
        self, init_scale: float = 10.0, init_bias: float = -10.0, learnable: bool = True, tile: int = 0,
    ) -> None:
        super().__init__()
        if init_scale <= 0:
            raise ValueError("init_scale must be positive")
        check_tile(tile)
        self.tile = tile
        # Shape [1], not 0-d: DeepSpeed's bf16 mode fails on 0-d parameters.
        self.logit_scale = nn.Parameter(torch.full([1], math.log(init_scale)), requires_grad=learnable)
        self.logit_bias = nn.Parameter(torch.full([1], float(init_bias)), requires_grad=learnable)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = batch["image"], batch["text"]
        dtype = torch.promote_types(image.dtype, torch.float32)
        with torch.autocast(image.device.type, enabled=False):
            image = F.normalize(image.to(dtype), dim=-1)
            text = F.normalize(text.to(dtype), dim=-1)
            scale, bias = self.logit_scale.to(dtype).exp(), self.logit_bias.to(dtype)
            texts = gather_with_grad(text)  # [B x world, D]
            b = image.shape[0]
            matching = scale * (image * texts[torch.arange(b, device=image.device) + b * rank()]).sum(1) + bias
            # -log sigmoid(-x) = softplus(x) for every pair, and -log sigmoid(x) = softplus(x) - x for the match
            negatives = reduce_rows(lambda rows: F.softplus(scale * rows @ texts.T + bias).sum(1), self.tile, image)
            loss = (negatives - matching).sum() / b
        return {"loss": loss, "logit_scale": scale.detach().reshape(()), "logit_bias": bias.detach().reshape(())}
