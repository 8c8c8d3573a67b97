"""P x K class-balanced batches: m samples of each of batch_size / m classes (Hermans et al. 2017, "In Defense of
the Triplet Loss for Person Re-Identification", PK sampling; as used for SupCon, Khosla et al. 2020, so that
every anchor has positives in the batch).
"""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.errors import UserError
from plugins.samplers.common import epoch_generator


class ClassBalancedSampler:
    """Batches of ``m`` samples from each of ``batch_size / m`` distinct classes (PK sampling, SupCon).

    Each batch draws its classes uniformly without replacement among the classes with at least ``m``
    samples (smaller classes are never drawn), and takes the next ``m`` samples of each from a per-class
    stream of reshuffled permutations, so a class's samples are used evenly. An epoch has
    ``n // batch_size`` batches, like the random sampler's. Deterministic from (seed, epoch); stateless.
    """

    def __init__(self, m: int = 4) -> None:
        if m < 1:
            raise UserError(f"class-balanced: m must be at least 1, not {m}")
        self.m = m

    def batches(self, n: int, labels: list[int] | None, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch``: ``batch_size // m`` classes x ``m`` samples each."""
        if labels is None:
            raise UserError("class-balanced needs labels: use it with a labelled dataset")
        if batch_size % self.m:
            raise UserError(f"class-balanced: batch_size {batch_size} is not divisible by m={self.m}: choose a "
                             f"--batch-size that is a multiple of {self.m} or another m")
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels[:n]):
            by_class.setdefault(int(y), []).append(i)
        eligible = sorted(c for c, members in by_class.items() if len(members) >= self.m)
        per_batch = batch_size // self.m
        if per_batch > len(eligible):
            raise UserError(f"class-balanced: a batch of {batch_size} needs {per_batch} classes with at least "
                             f"m={self.m} samples each, but the data has {len(eligible)}: lower --batch-size to at "
                             f"most {len(eligible) * self.m} or raise m")
        generator = epoch_generator(seed, epoch)
        streams: dict[int, list[int]] = {c: [] for c in eligible}

        def take(c: int) -> list[int]:
            if len(streams[c]) < self.m:  # refill with a fresh permutation: each sample once before repeats
                members, left = by_class[c], set(streams[c])
                fresh = [members[j] for j in torch.randperm(len(members), generator=generator).tolist()]
                # the leftovers go last in the new pass, so no sample appears twice among the next m
                streams[c] += [i for i in fresh if i not in left] + [i for i in fresh if i in left]
            out, streams[c] = streams[c][:self.m], streams[c][self.m:]
            return out

        result = []
        for _ in range(n // batch_size):
            chosen = torch.randperm(len(eligible), generator=generator)[:per_batch].tolist()
            result.append([i for j in chosen for i in take(eligible[j])])
        return result

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
