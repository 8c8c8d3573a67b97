"""MetaCLIP balancing: a caption-matched, per-entry capped subset of the train split, redrawn each epoch
(Xu et al. 2024, "Demystifying CLIP Data", Algorithm 1).

MetaCLIP matches each caption by substring against a list of metadata entries (about 500k, built from
WordNet, Wikipedia and the like), counts the matches of each entry over the pool, and keeps a sample
with probability ``t / count(entry)`` (``t`` = 20k in the paper, capped at 1) for each entry it
matches: head entries are subsampled to about ``t`` samples, tail entries are kept whole, and samples
that match no entry are dropped. Here a new subset is drawn each epoch from (seed, epoch).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import torch

from orchestrator.errors import UserError
from plugins.samplers.common import epoch_generator, full_batches


def keep_probabilities(matches: list[list[int]], entries: int, t: int) -> tuple[torch.Tensor, list[int]]:
    """(per-sample probability of being kept, per-entry match counts) under MetaCLIP's balancing.

    A sample is kept when any of its matched entries accepts it, each independently with probability
    ``min(1, t / count(entry))`` (the paper's loop over matched entries with an early break):
    ``1 - prod_e (1 - p_e)``; a sample without a match is never kept.
    """
    counts = Counter(e for matched in matches for e in matched)
    per_entry = [min(1.0, t / counts[e]) if counts[e] else 0.0 for e in range(entries)]
    keep = torch.tensor([1.0 - math.prod(1.0 - per_entry[e] for e in matched) if matched else 0.0
                         for matched in matches], dtype=torch.float64)
    return keep, [counts[e] for e in range(entries)]


class MetadataBalanceSampler:
    """MetaCLIP balancing: captions matched against metadata entries, each entry capped near ``t`` per epoch.

    ``entries``: the metadata (case-insensitive substrings of the captions, read by ``setup`` from the
    train split's captions). Empty (the default): each class is one entry and a sample matches its own
    label, which balances the classes. ``t``: the per-entry cap (paper: 20,000 for 400M pairs and 500k
    entries; the default 100 suits the shipped 4,000-sample MNIST). Each epoch keeps sample i when a
    uniform draw falls below its keep probability, then shuffles the kept samples into batches; all
    from (seed, epoch).
    """

    def __init__(self, entries: tuple[str, ...] = (), t: int = 100) -> None:
        if t < 1:
            raise UserError(f"metadata-balance: t must be at least 1, not {t}")
        if any(not e for e in entries):
            raise UserError("metadata-balance: an entry is empty (it would match every caption)")
        self.entries = tuple(entries)
        self.t = t
        self.matches: list[list[int]] | None = None
        self.counts: list[int] = []

    def setup(self, split: Any) -> None:
        """Match every caption of the train split against ``entries`` (no-op without entries)."""
        if not self.entries:
            return
        captions = getattr(split, "captions", None) or [split[i]["text"] for i in range(len(split))]
        lowered = [e.lower() for e in self.entries]
        self.matches = [[j for j, e in enumerate(lowered) if e in text.lower()] for text in captions]
        if not any(self.matches):
            raise UserError(f"metadata-balance: no caption contains any of the {len(self.entries)} entries "
                             f"({', '.join(self.entries[:3])}...): check entries")

    def keep(self, n: int, labels: list[int] | None) -> torch.Tensor:
        """Each sample's probability of being drawn in an epoch (entry counts in ``self.counts``)."""
        if self.entries:
            if self.matches is None:
                raise RuntimeError("metadata-balance with entries needs setup(train split) before batches()")
            matches, entries = self.matches, len(self.entries)
        elif labels is None:
            raise UserError("metadata-balance without entries balances classes and needs labels: give "
                             "entries=[...] to match captions instead")
        else:
            matches = [[int(y)] for y in labels[:n]]
            entries = max((m[0] for m in matches), default=-1) + 1
        if len(matches) != n:
            raise UserError(f"metadata-balance: setup saw {len(matches)} samples, batches() asks for {n}")
        keep, self.counts = keep_probabilities(matches, entries, self.t)
        return keep

    def batches(self, n: int, labels: list[int] | None, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch``: this epoch's balanced subset, shuffled."""
        keep = self.keep(n, labels)
        generator = epoch_generator(seed, epoch)
        drawn = torch.rand(n, generator=generator, dtype=torch.float64) < keep
        kept = drawn.nonzero().flatten()
        return full_batches(kept[torch.randperm(len(kept), generator=generator)].tolist(), batch_size)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
