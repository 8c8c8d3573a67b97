"""Symmetric InfoNCE over image-text pairs, the CLIP loss (Radford et al. 2021)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.distributed import gather_with_grad, rank
from plugins.losses.options import check_tile
from plugins.losses.tiles import reduce_rows


class InfoNCE(nn.Module):
    """Symmetric image-text InfoNCE with a learnable temperature (CLIP), exact across ranks.

    Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision".
    Each rank scores its B local embeddings against the B x world embeddings of every rank (gathered
    with gradients), labels ``arange(B) + B * rank``: the mean over ranks equals the loss on one batch
    of B x world. ``logit_scale`` starts at ln(1 / temperature) and is clamped to ln(max_logit_scale)
    after each step, as in open_clip. It has shape [1]: DeepSpeed's bf16 mode fails on 0-d parameters.
    ``tile`` > 0 scores that many rows of the similarity matrix at a time (Inf-CL, see ``tiles.py``): the
    same loss and gradients in memory linear in the global batch, for batches of 10^4-10^5 pairs.
    """

    def __init__(
        self, temperature: float = 0.07, learnable: bool = True, max_logit_scale: float = 100.0, tile: int = 0,
    ) -> None:
        super().__init__()
        if temperature <= 0 or max_logit_scale <= 0:
            raise ValueError("temperature and max_logit_scale must be positive")
        check_tile(tile)
        self.tile = tile
        self.max_log_scale = math.log(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.full([1], math.log(1 / temperature)), requires_grad=learnable)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = batch["image"], batch["text"]
        # Softmax over B x world logits in fp32 at least, whatever the autocast or engine precision.
        dtype = torch.promote_types(image.dtype, torch.float32)
        with torch.autocast(image.device.type, enabled=False):
            image = F.normalize(image.to(dtype), dim=-1)
            text = F.normalize(text.to(dtype), dim=-1)
            scale = self.logit_scale.to(dtype).exp()
            labels = torch.arange(image.shape[0], device=image.device) + image.shape[0] * rank()
            loss = (self._cross_entropy(image, gather_with_grad(text), scale, labels)
                    + self._cross_entropy(text, gather_with_grad(image), scale, labels)) / 2
        return {"loss": loss, "logit_scale": scale.detach().reshape(())}

    def _cross_entropy(self, rows: torch.Tensor, columns: torch.Tensor, scale: torch.Tensor,
                       labels: torch.Tensor) -> torch.Tensor:
        """Mean over rows of ``-log softmax(scale * rows @ columns.T)[label]``, as log-sum-exp minus the
        matching logit, so that the log-sum-exp can run tile by tile."""
        log_sum_exp = reduce_rows(lambda r: torch.logsumexp(scale * r @ columns.T, dim=1), self.tile, rows)
        return (log_sum_exp - scale * (rows * columns[labels]).sum(dim=1)).mean()

    @torch.no_grad()
    def after_step(self) -> None:
        """Clamp the learned scale to at most ``max_logit_scale`` (open_clip), in place."""
        self.logit_scale.data.clamp_(max=self.max_log_scale)
