"""Parts shared by the teacher-student losses (moco, byol, simsiam, swav, dino): MLP heads whose batch
normalisation sees the global batch, frozen EMA copies of the online network, and momentum schedules."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from orchestrator.distributed import gather_with_grad


class GlobalBatchNorm1d(nn.Module):
    """Batch normalisation over the global batch of every rank (SyncBN, as MoCo v3, BYOL, SimSiam and SwAV
    train their heads), with gradients through the gathered statistics: 2 ranks x B equal 1 rank x 2B.
    The heads only run in training, so it keeps no running statistics."""

    def __init__(self, dim: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(gather_with_grad(x), dim=0, unbiased=False)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x if self.weight is None else x * self.weight + self.bias


def mlp(dims: Sequence[int], bn: bool = True, last_bn: bool = False, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers through ``dims``; each hidden one followed by (global) batch norm if ``bn``, then
    ``act``; ``last_bn`` adds a batch norm without affine parameters on the output (MoCo v3, SimSiam)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers += [GlobalBatchNorm1d(b)] if bn else []
            layers.append(act())
    if last_bn:
        layers.append(GlobalBatchNorm1d(dims[-1], affine=False))
    return nn.Sequential(*layers)


def width(encoder: nn.Module) -> int:
    """The encoder's output width: its ``embed_dim`` (the contract), else its last linear layer's."""
    if isinstance(getattr(encoder, "embed_dim", None), int):
        return encoder.embed_dim
    return [m for m in encoder.modules() if isinstance(m, nn.Linear)][-1].out_features


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that takes no gradient: the teacher, a submodule of the loss, so it is checkpointed."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def ema_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher <- momentum * teacher + (1 - momentum) * student``, parameter by parameter, in place."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach().to(t.dtype), 1.0 - momentum)


def cosine_momentum(base: float, step: int, steps: int) -> float:
    """BYOL's schedule ``1 - (1 - base) (cos(pi k / K) + 1) / 2``, rising from ``base`` at step 0 to 1 at
    step ``K = steps``; ``steps = 0`` keeps ``base`` constant."""
    if steps <= 0:
        return base
    return 1 - (1 - base) * (math.cos(math.pi * min(step, steps) / steps) + 1) / 2
