"""Hard-negative batches: each batch is drawn from a few neighbouring clusters of the current embeddings.

Negatives close to the anchor are the informative ones (Robinson et al. 2021, "Contrastive Learning with
Hard Negative Samples"); they reweight negatives inside the loss. Building the batch itself from one
region of the embedding space gives every in-batch negative that property at no cost in the loss, as
the cluster-conditioned negatives of MCL (Xue et al. 2024, "Learning the Unlearned: Mitigating Feature
Suppression in Contrastive Learning") draw an anchor's negatives from its own cluster. The clusters come
from spherical k-means on the L2-normalised train embeddings, refreshed every ``refresh_every`` steps.
"""

from __future__ import annotations

from typing import Any

import torch

from orchestrator.errors import UserError
from plugins.samplers.common import epoch_generator, full_batches, spherical_kmeans
from plugins.samplers.random import RandomSampler


def nearest_chain(centroids: torch.Tensor) -> list[int]:
    """The clusters ordered by a greedy walk from cluster 0 to the most similar unvisited centroid."""
    similarity = centroids @ centroids.T
    visited = torch.zeros(len(centroids), dtype=torch.bool)
    chain = [0]
    visited[0] = True
    for _ in range(len(centroids) - 1):
        chain.append(int(similarity[chain[-1]].masked_fill(visited, float("-inf")).argmax()))
        visited[chain[-1]] = True
    return chain


class HardNegativeSampler:
    """Batches from a few neighbouring k-means clusters of the embeddings, so in-batch negatives are hard.

    Every ``refresh_every`` steps the engine passes the normalised train embeddings; spherical k-means
    (``clusters`` centroids, k-means++ seeding, ``iterations`` Lloyd steps) groups them, and the clusters
    are chained greedily by centroid similarity. Each epoch shuffles the members of every cluster,
    concatenates the clusters along the chain from a random starting cluster, cuts the sequence into
    batches (so a batch spans one cluster or a few neighbouring ones) and shuffles the batch order.
    Before the first refresh it gives the random sampler's batches. Deterministic from (seed, epoch)
    and the last refresh, which ``state_dict`` holds.
    """

    def __init__(self, refresh_every: int = 100, clusters: int = 64, iterations: int = 10) -> None:
        if refresh_every < 1 or clusters < 1 or iterations < 0:
            raise UserError(f"hard-negative needs refresh_every >= 1, clusters >= 1 and iterations >= 0, got "
                             f"{refresh_every}, {clusters}, {iterations}")
        self.refresh_every = refresh_every
        self.clusters = clusters
        self.iterations = iterations
        self.assignment: list[int] | None = None
        self.chain: list[int] = []
        self.refreshes = 0

    def refresh(self, embeddings: torch.Tensor) -> None:
        """Cluster the ``[N, D]`` train embeddings (k-means seeded by the number of refreshes so far)."""
        self.refreshes += 1
        labels, centroids = spherical_kmeans(embeddings, self.clusters, self.iterations, seed=self.refreshes)
        self.assignment = labels.tolist()
        self.chain = nearest_chain(centroids)

    def batches(self, n: int, labels: list[int] | None, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        """The global batches of ``epoch``: runs of neighbouring clusters, in a random order."""
        if self.assignment is None:
            return RandomSampler().batches(n, labels, batch_size, seed, epoch)
        if len(self.assignment) != n:
            raise UserError(f"hard-negative: the last refresh clustered {len(self.assignment)} samples, not {n}")
        generator = epoch_generator(seed, epoch)
        members: list[list[int]] = [[] for _ in self.chain]
        for i in torch.randperm(n, generator=generator).tolist():
            members[self.assignment[i]].append(i)
        start = int(torch.randint(len(self.chain), (1,), generator=generator))
        order = [i for c in self.chain[start:] + self.chain[:start] for i in members[c]]
        batches = full_batches(order, batch_size)
        return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]

    def state_dict(self) -> dict[str, Any]:
        return {"assignment": self.assignment, "chain": self.chain, "refreshes": self.refreshes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.assignment = state.get("assignment")
        self.chain = list(state.get("chain", []))
        self.refreshes = int(state.get("refreshes", 0))
