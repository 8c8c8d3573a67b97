"""Activation checkpointing for the built-in encoders, per block as in open_clip and timm.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost": a checkpointed block keeps only its
input in the forward pass and recomputes its activations in the backward pass (``torch.utils.checkpoint``,
non-reentrant). The recomputation replays the same random numbers (dropout, stochastic depth), and batch
norm layers do not update their running statistics a second time while recomputing.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class _RecomputeWithoutStats(AbstractContextManager):
    """While recomputing, batch norm layers in training mode normalise by the batch (as they did in the
    forward pass) but leave their running statistics alone: momentum 0 keeps ``running_mean`` and
    ``running_var`` (switching the statistics off instead would change what autograd saves), and
    ``num_batches_tracked`` is put back."""

    def __init__(self, module: nn.Module) -> None:
        self.norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                      and m.track_running_stats]
        self.saved: list[tuple[float | None, torch.Tensor]] = []

    def __enter__(self) -> None:
        self.saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc: object) -> None:
        for m, (momentum, tracked) in zip(self.norms, self.saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def run_block(module: nn.Module, enabled: bool, *args: Any, **kwargs: Any) -> Any:
    """``module(*args, **kwargs)``, checkpointed when ``enabled`` and gradients are being recorded."""
    if not (enabled and torch.is_grad_enabled()):
        return module(*args, **kwargs)
    return checkpoint(module, *args, use_reentrant=False,
                      context_fn=lambda: (nullcontext(), _RecomputeWithoutStats(module)), **kwargs)
