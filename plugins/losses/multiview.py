"""Shared pieces of the losses over V augmented views of each image, exact across ranks.

``gather_views`` stacks the views of the GLOBAL batch (gathered with gradients, in fp32) as ``[V, N, D]``,
row ``j`` of each being sample ``j`` of the global batch (rank ``r`` holds rows ``r * B .. (r + 1) * B``),
and returns the slice of this rank's samples. A loss then uses this rank's rows as anchors against every
row, so that the mean over ranks of its loss is the loss of one rank holding the whole batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orchestrator.distributed import gather_with_grad, rank


def gather_views(views: list[torch.Tensor], normalize: bool = True) -> tuple[torch.Tensor, slice]:
    """The V views of the global batch as one fp32 tensor ``[V, N, D]`` (L2-normalised rows if ``normalize``)
    and the slice of this rank's samples along N. Call it with autocast disabled."""
    if len(views) < 2:
        raise ValueError(f"need at least two views, got {len(views)}")
    dtype = torch.promote_types(views[0].dtype, torch.float32)
    z = torch.stack([gather_with_grad(v.to(dtype)) for v in views])
    b = views[0].shape[0]
    return (F.normalize(z, dim=-1) if normalize else z), slice(rank() * b, (rank() + 1) * b)


def anchor_logits(z: torch.Tensor, local: slice, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities / temperature of this rank's anchors ``z[:, local]`` (rows ``v * B + i``) to every view of
    the global batch (columns ``v * N + j``), ``[V * B, V * N]``; and the mask of each anchor's own column."""
    v, n, d = z.shape
    anchors = z[:, local].reshape(-1, d)
    logits = anchors @ z.reshape(v * n, d).T / temperature
    own = torch.arange(n, device=z.device)[local] + n * torch.arange(v, device=z.device)[:, None]  # [V, B]
    return logits, F.one_hot(own.reshape(-1), v * n).bool()


def multi_positive_nce(z: torch.Tensor, local: slice, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """The mean over this rank's anchors of ``-1/|P(a)| sum_{p in P(a)} log softmax_{k != a}(z_a . z_k / t)_p``,
    where P(a) holds every other view whose target equals the anchor's (``targets``: one per global sample).
    With the sample index as target and two views this is SimCLR's NT-Xent; with labels, SupCon's L_out."""
    logits, own = anchor_logits(z, local, temperature)
    v = z.shape[0]
    positive = (targets[local].repeat(v)[:, None] == targets.repeat(v)[None, :]) & ~own
    log_prob = logits.masked_fill(own, float("-inf")).log_softmax(dim=1)
    return -(torch.where(positive, log_prob, 0.0).sum(dim=1) / positive.sum(dim=1)).mean()


def positive_similarity(z: torch.Tensor, local: slice) -> torch.Tensor:
    """The mean cosine similarity (detached) between different views of this rank's samples, for logging."""
    v = z.shape[0]
    sims = torch.einsum("vnd,wnd->vwn", z[:, local], z[:, local]).detach()
    return (sims.sum(dim=(0, 1)) - sims.diagonal().sum(dim=-1)).mean() / (v * (v - 1))
