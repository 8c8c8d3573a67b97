"""Small distributed helpers for plugins: rank, world size, and an all-gather that carries gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherWithGrad(torch.autograd.Function):
    """All-gather forward; the backward sums every rank's gradient of the gathered tensor and keeps this
    rank's slice: a reduce-scatter on NCCL; an all-reduce and a slice elsewhere (gloo's reduce-scatter is not
    there in every torch that orch supports)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty((world_size() * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        if dist.get_backend() == "nccl":
            out = grad.new_empty((grad.shape[0] // world_size(), *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad.contiguous())
            return out
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total.chunk(world_size())[rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order, keeping gradients.

    The backward pass sums the gradients of every rank's copy and hands each rank the slice of its own
    input, which is what makes a loss over the gathered batch equal to the loss over one large batch
    (open_clip ``gather_features(gather_with_grad=True)``; lightly #1528 for the bug without it).
    Every rank must pass the same shape.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank without gradients (targets, labels, queues)."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
