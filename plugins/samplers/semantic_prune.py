"""Concept-cluster pruning of the train split: Density-Based Pruning (DBP; Abbas et al. 2024, "Effective
pruning of web-scale datasets based on complexity of concept clusters"), optionally after SemDeDup (Abbas
et al. 2023, "SemDeDup: Data-efficient learning at web-scale through semantic deduplication").

The embeddings are clustered with k-means (the paper: spherical k-means on pretrained image embeddings).
SemDeDup removes near-duplicates inside each cluster: with the members ordered from least to most
similar to the centroid, a member is dropped when its cosine similarity to an earlier one exceeds
``1 - eps``. DBP then gives each cluster a share of the kept budget from its complexity
``C_j = d_inter_j * d_intra_j``: ``d_intra`` the mean cosine distance of its members to its centroid,
``d_inter`` the mean cosine distance of its centroid to its ``neighbours`` nearest centroids; shares are
``softmax(C / temperature)``, capped at the cluster's size (the excess goes to the other clusters in
proportion). Inside a cluster the most prototypical members (closest to the centroid; the SSP-Pruning
metric of Sorscher et al. 2022, "Beyond neural scaling laws") are pruned first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.errors import UserError
from plugins.samplers.common import epoch_generator, full_batches, spherical_kmeans
from plugins.samplers.random import RandomSampler

ONCE = 2**62  # refresh_every that means: refresh before the first epoch only


def semdedup(members: torch.Tensor, points: torch.Tensor, eps: float) -> torch.Tensor:
    """The members (ordered least prototypical first) that are no near-duplicate of an earlier member."""
    if eps <= 0 or len(members) < 2:
        return members
    x = points[members]
    similarity = (x @ x.T).triu(diagonal=1)  # [i, j]: similarity of j to an earlier member i
    return members[similarity.max(dim=0).values <= 1 - eps]


def cluster_quotas(total: int, sizes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Integers summing to ``min(total, sizes.sum())``, each at most its size, in proportion to ``weights``.

    Water-filling: clusters whose share exceeds their size keep all their members and the rest of the
    budget is shared again among the others; the fractions are then rounded by largest remainder.
    """
    total = min(total, int(sizes.sum()))
    share = np.zeros(len(sizes))
    free = np.ones(len(sizes), dtype=bool)
    remaining = float(total)
    while free.any():
        proposal = remaining * weights[free] / weights[free].sum()
        full = proposal >= sizes[free]
        if not full.any():
            share[free] = proposal
            break
        index = np.flatnonzero(free)[full]
        share[index] = sizes[index]
        remaining -= sizes[index].sum()
        free[index] = False
    quotas = np.minimum(np.floor(share + 1e-9).astype(int), sizes)
    for j in np.argsort(-(share - quotas), kind="stable")[:total - quotas.sum()]:
        quotas[j] += 1
    return quotas


class SemanticPruneSampler:
    """Batches from a pruned train split: SemDeDup, then DBP's concept-specific pruning of prototypical samples.

    ``keep``: the fraction of the train split that is kept. ``clusters``, ``iterations``: spherical
    k-means. ``neighbours``: nearest centroids for d_inter. ``temperature``: of the softmax over cluster
    complexities (lower: more of the budget to complex clusters). ``dedup_eps``: SemDeDup's threshold
    (0: no deduplication). ``embeddings``: a ``.npy`` or ``.pt`` ``[N, D]`` file of precomputed train
    embeddings (the paper prunes with a pretrained model's); without it the engine's embeddings of the
    current encoder are used, refreshed every ``reprune_every`` steps (0: once, before training). Before
    any pruning the batches are the random sampler's. Each epoch shuffles the kept samples from
    (seed, epoch); ``state_dict`` holds the kept set.
    """

    def __init__(self, keep: float = 0.5, clusters: int = 50, iterations: int = 20, neighbours: int = 20,
                 temperature: float = 0.1, dedup_eps: float = 0.0, embeddings: Path | None = None,
                 reprune_every: int = 0) -> None:
        if not 0.0 < keep <= 1.0 or clusters < 1 or neighbours < 1 or temperature <= 0 or dedup_eps < 0:
            raise UserError(f"semantic-prune needs 0 < keep <= 1, clusters >= 1, neighbours >= 1, temperature > 0 "
                             f"and dedup_eps >= 0, got {keep}, {clusters}, {neighbours}, {temperature}, {dedup_eps}")
        self.keep = keep
        self.clusters = clusters
        self.iterations = iterations
        self.neighbours = neighbours
        self.temperature = temperature
        self.dedup_eps = dedup_eps
        self.embeddings = Path(embeddings) if embeddings is not None else None
        self.refresh_every = 0 if self.embeddings is not None else (reprune_every or ONCE)
        self.kept: list[int] | None = None
        self.refreshes = 0
        self.report: dict[str, Any] = {}

    def refresh(self, embeddings: torch.Tensor) -> None:
        """Prune from the ``[N, D]`` train embeddings (k-means seeded by the number of refreshes so far)."""
        self.refreshes += 1
        points = F.normalize(embeddings.float(), dim=-1)
        assignment, centroids = spherical_kmeans(points, self.clusters, self.iterations, seed=self.refreshes)
        k = len(centroids)
        similarity_to_centroid = (points * centroids[assignment]).sum(dim=1)
        members = []
        for j in range(k):
            index = (assignment == j).nonzero().flatten()
            index = index[similarity_to_centroid[index].argsort(stable=True)]  # least prototypical first
            members.append(semdedup(index, points, self.dedup_eps))
        sizes = np.array([len(m) for m in members])
        d_intra = np.array([float((1 - similarity_to_centroid[m]).mean()) if len(m) else 0.0 for m in members])
        centroid_distance = 1 - centroids @ centroids.T
        centroid_distance.fill_diagonal_(float("inf"))
        l_nearest = min(self.neighbours, k - 1)
        d_inter = (centroid_distance.topk(l_nearest, dim=1, largest=False).values.mean(dim=1).numpy()
                   if l_nearest else np.ones(k))
        complexity = d_inter * d_intra
        weights = np.exp((complexity - complexity[sizes > 0].max()) / self.temperature) * (sizes > 0)
        quotas = cluster_quotas(round(self.keep * len(points)), sizes, weights)
        self.kept = sorted(int(i) for m, q in zip(members, quotas, strict=True) for i in m[:q])
        self.report = {"clusters": k, "sizes": sizes.tolist(), "quotas": quotas.tolist(),
                       "complexity": complexity.tolist(), "deduplicated": len(points) - int(sizes.sum()),
                       "kept": len(self.kept), "of": len(points)}

    def batches(self, n: int, labels: list[int] | None, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch``: the kept samples, shuffled."""
        if self.kept is None and self.embeddings is not None:
            self.refresh(self._load(n))
        if self.kept is None:
            return RandomSampler().batches(n, labels, batch_size, seed, epoch)
        if self.kept and self.kept[-1] >= n:
            raise UserError(f"semantic-prune: the kept set indexes {self.kept[-1] + 1}+ samples, the split has {n}")
        order = torch.randperm(len(self.kept), generator=epoch_generator(seed, epoch)).tolist()
        return full_batches([self.kept[j] for j in order], batch_size)

    def _load(self, n: int) -> torch.Tensor:
        path = self.embeddings
        data = np.load(path) if path.suffix == ".npy" else torch.load(path, map_location="cpu", weights_only=True)
        embeddings = torch.as_tensor(np.asarray(data), dtype=torch.float32)
        if embeddings.ndim != 2 or len(embeddings) != n:
            raise UserError(f"semantic-prune: {path} holds {tuple(embeddings.shape)} embeddings; want [{n}, D], one "
                             f"row per train sample in order")
        return embeddings

    def state_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "refreshes": self.refreshes, "report": self.report}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = state.get("kept")
        self.refreshes = int(state.get("refreshes", 0))
        self.report = dict(state.get("report", {}))
