"""Token-wise late-interaction image-text InfoNCE, FILIP (Yao et al. 2022)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.distributed import gather, gather_with_grad, rank
from plugins.losses.options import check_tile
from plugins.losses.tiles import reduce_rows


def token_similarity(queries: torch.Tensor, query_mask: torch.Tensor, keys: torch.Tensor,
                     key_mask: torch.Tensor) -> torch.Tensor:
    """``[Bq, Bk]``: for each query sample i and key sample j, the mean over the real tokens of i of the
    best cosine similarity with a real token of j (FILIP's token-wise maximum similarity).

    ``queries`` ``[Bq, K, D]`` and ``keys`` ``[Bk, R, D]`` are unit-norm; the masks are True on real tokens.
    """
    sim = torch.einsum("ikd,jrd->ijkr", queries, keys)
    return _mean_of_best(sim, query_mask[:, None, :], key_mask[None, :, None, :])


def pair_similarity(queries: torch.Tensor, query_mask: torch.Tensor, keys: torch.Tensor,
                    key_mask: torch.Tensor) -> torch.Tensor:
    """``[B]``: ``token_similarity`` of query i with key i only (the matching pairs), without the B x B rest."""
    sim = torch.einsum("ikd,ird->ikr", queries, keys)
    return _mean_of_best(sim, query_mask, key_mask[:, None, :])


def _mean_of_best(sim: torch.Tensor, query_mask: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """``sim`` ``[..., K, R]`` and masks that broadcast to it (query ``[..., K]``, key ``[..., 1, R]``)."""
    best = sim.masked_fill(~key_mask, -math.inf).amax(dim=-1)  # [..., K]
    return best.masked_fill(~query_mask, 0).sum(dim=-1) / query_mask.sum(dim=-1)


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weight = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weight).sum(dim=1) / weight.sum(dim=1)


class FILIP(nn.Module):
    """Token-wise late-interaction InfoNCE over image and text tokens, with a learnable temperature (FILIP).

    Yao et al. 2022, "FILIP: Fine-grained Interactive Language-Image Pre-Training". Image i and text j are
    compared token by token: ``s^I_ij`` is the mean over the image tokens of i of their highest cosine
    similarity with a token of text j, ``s^T_ij`` the mean over the text tokens of i of their highest
    similarity with a token of image j, padding left out through the masks. The loss is InfoNCE image->text
    on ``s^I`` and text->image on ``s^T``, averaged, with CLIP's learnable temperature (``temperature``,
    clamped to ``max_logit_scale``). Tokens and masks are gathered from every rank (tokens with gradients),
    so 2 ranks x B equal 1 rank x 2B; every rank must give the same number of tokens (fixed image size,
    text padded to the context length).

    The similarity holds B x B x world x K x R floats per rank: fine for the small towers. ``tile`` > 0
    holds ``tile`` x B x world x K x R instead (the rows of each direction scored a tile at a time and
    recomputed in the backward pass, ``tiles.py``), with the same loss and gradients; FILIP's token
    reduction, which shrinks K and R, is not implemented. Zero-shot evaluation here uses the pooled
    embeddings (``forward``), which the token-wise loss does not train directly; ``global_weight`` > 0 adds
    that weight times a global InfoNCE on the masked mean of each sample's token features (computed from the
    same tokens, so no second encoder pass), which ties the mean of the tokens to the pair.
    """

    def __init__(self, temperature: float = 0.07, learnable: bool = True, max_logit_scale: float = 100.0,
                 global_weight: float = 0.0, tile: int = 0) -> None:
        super().__init__()
        if temperature <= 0 or max_logit_scale <= 0:
            raise ValueError("temperature and max_logit_scale must be positive")
        if global_weight < 0:
            raise ValueError("global_weight must be 0 or more")
        check_tile(tile)
        self.tile = tile
        self.global_weight = global_weight
        self.max_log_scale = math.log(max_logit_scale)
        self.logit_scale = nn.Parameter(torch.full([1], math.log(1 / temperature)), requires_grad=learnable)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = batch["image_tokens"], batch["text_tokens"]
        image_mask, text_mask = batch["image_mask"].bool(), batch["text_mask"].bool()
        dtype = torch.promote_types(image.dtype, torch.float32)
        with torch.autocast(image.device.type, enabled=False):
            image, text = image.to(dtype), text.to(dtype)
            scale = self.logit_scale.to(dtype).exp()
            labels = torch.arange(image.shape[0], device=image.device) + image.shape[0] * rank()
            unit_image, unit_text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
            token_loss = (self._cross_entropy(unit_image, image_mask, unit_text, text_mask, scale, labels)
                          + self._cross_entropy(unit_text, text_mask, unit_image, image_mask, scale, labels)) / 2
            out = {"token_loss": token_loss.detach(), "logit_scale": scale.detach().reshape(())}
            loss = token_loss
            if self.global_weight > 0:
                pooled_image = F.normalize(_masked_mean(image, image_mask), dim=-1)
                pooled_text = F.normalize(_masked_mean(text, text_mask), dim=-1)
                global_loss = (F.cross_entropy(scale * pooled_image @ gather_with_grad(pooled_text).T, labels)
                               + F.cross_entropy(scale * pooled_text @ gather_with_grad(pooled_image).T, labels)) / 2
                out["global_loss"] = global_loss.detach()
                loss = loss + self.global_weight * global_loss
        return {"loss": loss, **out}

    def _cross_entropy(self, queries: torch.Tensor, query_mask: torch.Tensor, keys: torch.Tensor,
                       key_mask: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """InfoNCE of the local queries over the keys of every rank, as log-sum-exp minus the matching
        pair's logit, so that the log-sum-exp can run tile by tile."""
        all_keys, all_masks = gather_with_grad(keys), gather(key_mask)
        log_sum_exp = reduce_rows(
            lambda q, m: torch.logsumexp(scale * token_similarity(q, m, all_keys, all_masks), dim=1),
            self.tile, queries, query_mask)
        matching = pair_similarity(queries, query_mask, all_keys[labels], all_masks[labels])
        return (log_sum_exp - scale * matching).mean()

    @torch.no_grad()
    def after_step(self) -> None:
        """Clamp the learned scale to at most ``max_logit_scale`` (open_clip), in place."""
        self.logit_scale.data.clamp_(max=self.max_log_scale)
