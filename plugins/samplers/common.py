"""Helpers shared by the built-in samplers: per-epoch generators, full batches, spherical k-means."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

ASSIGN_BUDGET = 2**24  # entries of one [points, centroids] similarity block in k-means


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A generator seeded from (seed, epoch) alone, as ``RandomSampler`` seeds its permutation."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)


def full_batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """``order`` cut into consecutive batches of ``batch_size``; a short last batch is dropped."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, not {batch_size}")
    order = [int(i) for i in order]
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def assign(points: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the most cosine-similar centroid, that similarity) per unit-norm point, in blocks."""
    step = max(1, ASSIGN_BUDGET // max(1, len(centroids)))
    best, similarity = [], []
    for start in range(0, len(points), step):
        values, index = (points[start:start + step] @ centroids.T).max(dim=1)
        best.append(index)
        similarity.append(values)
    return torch.cat(best), torch.cat(similarity)


def spherical_kmeans(points: torch.Tensor, k: int, iterations: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means (Dhillon & Modha 2001): cosine assignment, centroids = normalised member means.

    ``points`` ``[N, D]`` are L2-normalised. Initialised by k-means++ seeding (Arthur & Vassilvitskii 2007,
    with the cosine distance) from a generator seeded with ``seed``; an empty cluster keeps its centroid.
    Deterministic on the CPU. Returns (assignment ``[N]`` long, unit-norm centroids ``[k, D]``); ``k`` is
    capped at N.
    """
    points = F.normalize(points.float(), dim=-1)
    k = max(1, min(k, len(points)))
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    nearest = 1 - points @ points[chosen[0]]
    for _ in range(k - 1):
        weights = nearest.clamp(min=0).double() ** 2
        if weights.sum() <= 0:  # fewer distinct points than k: any point not yet chosen
            weights = torch.ones(len(points), dtype=torch.float64)
            weights[chosen] = 0
        chosen.append(int(torch.multinomial(weights, 1, generator=generator)))
        nearest = torch.minimum(nearest, 1 - points @ points[chosen[-1]])
    centroids = points[chosen].clone()
    labels = assign(points, centroids)[0]
    for _ in range(iterations):
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        filled = sums.norm(dim=1) > 0
        centroids[filled] = F.normalize(sums[filled], dim=-1)
        new = assign(points, centroids)[0]
        if torch.equal(new, labels):
            break
        labels = new
    return labels, centroids
