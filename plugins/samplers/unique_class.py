"""Batches without two samples of one class, so that no in-batch negative shares the anchor's class.

Negatives that share the anchor's class ("class collision", Chuang et al. 2020, "Debiased Contrastive
Learning") bias the contrastive loss; with captions made from class labels, two images of one class in
a CLIP batch even have identical captions, so each is a false negative for the other (UniCL, Yang et al.
2022, counts such pairs as positives instead). One sample per class per batch removes every collision.
"""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.errors import UserError
from plugins.samplers.common import epoch_generator


class UniqueClassSampler:
    """Batches with at most one sample per class (no false negatives from shared labels or captions).

    Each class's samples are shuffled into a queue each epoch; each batch takes one sample from each of
    the ``batch_size`` classes with the most samples left (ties broken at random), which makes the most
    batches possible: with balanced classes every sample is used once per epoch. The epoch ends when
    fewer than ``batch_size`` classes have samples left. Needs ``batch_size`` <= the number of classes.
    Deterministic from (seed, epoch); stateless.
    """

    def batches(self, n: int, labels: list[int] | None, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch``, each holding ``batch_size`` samples of distinct classes."""
        if labels is None:
            raise UserError("unique-class needs labels: use it with a labelled dataset")
        by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels[:n]):
            by_class.setdefault(int(y), []).append(i)
        classes = sorted(by_class)
        if not 1 <= batch_size <= len(classes):
            raise UserError(f"unique-class: a batch of {batch_size} samples of distinct classes is impossible with "
                             f"{len(classes)} classes: use --batch-size {len(classes)} or less, or another sampler")
        generator = epoch_generator(seed, epoch)
        queues = []
        for c in classes:
            members = by_class[c]
            queues.append([members[j] for j in torch.randperm(len(members), generator=generator).tolist()])
        left = torch.tensor([len(q) for q in queues], dtype=torch.float64)
        result = []
        while int((left > 0).sum()) >= batch_size:
            jitter = torch.rand(len(left), generator=generator, dtype=torch.float64) / 2  # breaks ties only
            chosen = (left + jitter).topk(batch_size).indices.tolist()
            result.append([queues[c][len(queues[c]) - int(left[c])] for c in chosen])
            left[chosen] -= 1
        return result

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
