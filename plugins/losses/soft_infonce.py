"""InfoNCE with continuously weighted targets, CWCL (Srinivasa et al. 2023)."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.distributed import gather, gather_with_grad
from plugins.losses.options import check_tile
from plugins.losses.tiles import reduce_rows


class SoftInfoNCE(nn.Module):
    """Symmetric image-text InfoNCE whose targets are weighted by intra-modal similarity (CWCL).

    Srinivasa et al. 2023, "CWCL: Cross-Modal Transfer with Continuously Weighted Contrastive Loss": the
    one-hot target of InfoNCE becomes ``w_ij = (q_i.q_j + 1) / 2``, the cosine similarity of the embeddings
    of samples i and j in one modality (``weights``: ``text``, the paper's choice when the text tower is a
    pretrained, frozen one; or ``image``), detached, then normalised to sum to 1 per row. Pairs that look
    alike in that modality are then not pushed apart as hard negatives. The same targets serve both
    directions (``w`` is symmetric). With ``w = I`` it is InfoNCE (CLIP). The temperature is learnable as in
    ``infonce`` (start ``temperature``, ``logit_scale`` clamped to ln ``max_logit_scale`` after each step).
    Each rank scores its B rows against the B x world columns of every rank: exact across ranks.
    ``tile`` > 0 scores that many rows at a time, their targets included (Inf-CL, see ``tiles.py``): the same
    loss and gradients without the two B x B·world matrices.
    """

    def __init__(self, weights: Literal["text", "image"] = "text", temperature: float = 0.07,
                 learnable: bool = True, max_logit_scale: float = 100.0, tile: int = 0) -> None:
        super().__init__()
        if weights not in ("text", "image"):
            raise ValueError(f"weights must be 'text' or 'image', not {weights!r}")
        if temperature <= 0 or max_logit_scale <= 0:
            raise ValueError("temperature and max_logit_scale must be positive")
        check_tile(tile)
        self.weights, self.tile = weights, tile
        self.max_log_scale = math.log(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.full([1], math.log(1 / temperature)), requires_grad=learnable)

    def targets(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Row-normalised CWCL weights of some samples (``rows``) against the gathered batch (``columns``), from
        the unit-norm, detached embeddings of the ``weights`` modality."""
        w = (rows @ columns.T + 1) / 2
        return w / w.sum(dim=-1, keepdim=True)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = batch["image"], batch["text"]
        dtype = torch.promote_types(image.dtype, torch.float32)
        with torch.autocast(image.device.type, enabled=False):
            image = F.normalize(image.to(dtype), dim=-1)
            text = F.normalize(text.to(dtype), dim=-1)
            scale = self.logit_scale.to(dtype).exp()
            q = (text if self.weights == "text" else image).detach()
            q_columns, texts, images = gather(q), gather_with_grad(text), gather_with_grad(image)

            def per_row(image_rows: torch.Tensor, text_rows: torch.Tensor, q_rows: torch.Tensor) -> torch.Tensor:
                """Both directions' ``-sum_j w_ij log softmax(logits_i)_j`` for these rows: ``w`` is symmetric,
                so one row of targets serves image->text and text->image alike."""
                log_p = (F.log_softmax(scale * image_rows @ texts.T, dim=-1)
                         + F.log_softmax(scale * text_rows @ images.T, dim=-1))
                return -(self.targets(q_rows, q_columns) * log_p).sum(dim=-1)

            loss = reduce_rows(per_row, self.tile, image, text, q).mean() / 2
        return {"loss": loss, "logit_scale": scale.detach().reshape(())}

    @torch.no_grad()
    def after_step(self) -> None:
        """Clamp the learned scale to at most ``max_logit_scale`` (open_clip), in place."""
        self.logit_scale.data.clamp_(max=self.max_log_scale)
