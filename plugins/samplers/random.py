"""Uniformly shuffled batches, a new permutation each epoch: the default sampler."""

from __future__ import annotations

from typing import Any

import torch


class RandomSampler:
    """Shuffle the train split each epoch and cut it into global batches (the standard SGD sampler).

    Each epoch is a permutation of all indices drawn from a generator seeded from (seed, epoch) alone,
    so any epoch can be replayed without replaying the ones before (as ``DistributedSampler`` seeds
    with ``seed + epoch``); it keeps no state across epochs. ``drop_last`` drops the short last batch.
    """

    def __init__(self, drop_last: bool = True) -> None:
        self.drop_last = drop_last

    def batches(
        self, n: int, labels: list[int] | None, batch_size: int, seed: int, epoch: int,
    ) -> list[list[int]]:
        """The global batches (lists of indices into ``range(n)``) of ``epoch``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
        order = torch.randperm(n, generator=generator).tolist()
        stop = n - n % batch_size if self.drop_last else n
        return [order[i:i + batch_size] for i in range(0, stop, batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
