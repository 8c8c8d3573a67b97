"""A class-balanced sampler: every batch mixes the classes in equal shares."""

from __future__ import annotations

from typing import Any

import torch


class StratifiedSampler:
    """Class-balanced batches: each class shuffled, then dealt round-robin, so each batch mixes all classes.

    Deterministic from (seed, epoch) alone, so it keeps no state. Classes with fewer samples run out
    first; the rest of the epoch then mixes the remaining classes. The short last batch is dropped.
    """

    def __init__(self, shuffle_classes: bool = True) -> None:
        self.shuffle_classes = shuffle_classes

    def batches(self, n: int, labels: list[int] | None, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        if labels is None:
            raise ValueError("the example-stratified sampler needs a labelled train split")
        generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_class.setdefault(y, []).append(i)
        queues = [[idx[j] for j in torch.randperm(len(idx), generator=generator).tolist()]
                  for _, idx in sorted(by_class.items())]
        if self.shuffle_classes:
            queues = [queues[j] for j in torch.randperm(len(queues), generator=generator).tolist()]
        order = [q[k] for k in range(max(map(len, queues))) for q in queues if k < len(q)]
        return [order[i:i + batch_size] for i in range(0, n - n % batch_size, batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
