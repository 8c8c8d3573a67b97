"""Small distributed helpers for plugins: rank, world size, and an all-gather that carries gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order, keeping gradients.

    The backward pass sums the gradients of every rank's copy and hands each rank the slice of its own
    input, which is what makes a loss over the gathered batch equal to the loss over one large batch
    (open_clip ``gather_features(gather_with_grad=True)``; lightly #1528 for the bug without it).
    """
    if not is_distributed():
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank without gradients (targets, labels, queues)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
