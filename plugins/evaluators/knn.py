"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018, "Unsupervised Feature
Learning via Non-Parametric Instance Discrimination", section 3.4; the protocol of DINO, Caron et al. 2021,
``eval_knn.py``).

The L2-normalised features of the train split form the memory bank. Each held-out sample finds its
``k`` most cosine-similar bank entries; neighbour ``i`` votes for its class with weight
``exp(s_i / T)``; the class with the largest summed vote wins. top-5 ranks the classes by vote.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from orchestrator.engine.evaluation import EvalContext
from orchestrator.errors import UserError

SIMILARITY_BUDGET = 2**26  # entries of one [queries, bank] similarity block (256 MiB in float32)


def knn_votes(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, classes: int,
              k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """``[queries, classes]`` summed votes ``sum_{i in top-k} exp(s_i / T) * onehot(y_i)``.

    ``bank`` ``[N, D]`` and ``queries`` ``[M, D]`` are unit-norm; ``s_i`` is the cosine similarity. The
    queries go in blocks so that one similarity block holds at most ``SIMILARITY_BUDGET`` entries.
    """
    k = min(k, len(bank))
    bank_labels = bank_labels.to(bank.device)
    step = max(1, SIMILARITY_BUDGET // max(1, len(bank)))
    out = []
    for start in range(0, len(queries), step):
        similarity = queries[start:start + step].to(bank.device) @ bank.T
        top, index = similarity.topk(k, dim=-1)
        votes = torch.zeros(len(top), classes, device=bank.device, dtype=top.dtype)
        votes.scatter_add_(1, bank_labels[index], (top / temperature).exp())
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, classes, device=bank.device)


def vote_accuracy(votes: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1 (and top5 when there are more than 5 classes) in percent from ``[M, classes]`` scores."""
    ks = (1, 5) if votes.shape[1] > 5 else (1,)
    hits = votes.topk(max(ks), dim=-1).indices == labels.to(votes.device)[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=-1).sum().item() / len(labels) for k in ks}


class KNN:
    """Weighted kNN top-1/top-5 on the held-out split with the train split as the bank (InstDisc, DINO).

    ``k`` neighbours (DINO reports k=20), vote weights ``exp(cos / temperature)`` (T=0.07).
    ``representation``: the encoder's output (``embedding``) or its representation before the projection head
    (``backbone``, as SimCLR and DINO evaluate self-supervised encoders); ``auto`` (the default) is ``backbone``
    when the encoder has a ``representation`` method. The protocol records the one used.
    """

    def __init__(self, k: int = 20, temperature: float = 0.07,
                 representation: Literal["auto", "embedding", "backbone"] = "auto") -> None:
        if k < 1 or temperature <= 0:
            raise UserError(f"knn needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
        self.k = k
        self.temperature = temperature
        self.representation = representation
        self._seen: dict[str, Any] = {}

    def protocol(self) -> dict[str, Any]:
        """How the numbers were obtained (sample counts once ``evaluate`` has run)."""
        return {"evaluator": "weighted kNN (Wu et al. 2018; DINO, Caron et al. 2021)", "k": self.k,
                "temperature": self.temperature, "representation": self.representation,
                "similarity": "cosine (L2-normalised features)",
                "weights": "exp(similarity / temperature), summed per class", "bank_split": "train",
                "eval_split": "test", **self._seen}

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        dataset = ctx.dataset
        representation = ctx.resolve(self.representation)
        bank, bank_labels = ctx.encode_split(dataset.train, representation)
        queries, labels = ctx.encode_split(dataset.test, representation)
        names = getattr(dataset, "class_names", None)
        classes = len(names) if names else int(max(bank_labels.max(), labels.max())) + 1
        votes = knn_votes(bank, bank_labels, queries, classes, self.k, self.temperature)
        self._seen = {"representation": representation,
                      "bank_samples": len(bank), "eval_samples": len(queries), "classes": classes,
                      "k_used": min(self.k, len(bank))}
        return vote_accuracy(votes, labels)
