"""hard-negative: batches from neighbouring k-means clusters of the embeddings the engine passes."""

import pytest
import torch
import torch.nn.functional as F
from engine_shards import assert_ranks_disjoint, assert_resumes

from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.testing import assert_light, check_sampler
from plugins.samplers.common import spherical_kmeans
from plugins.samplers.hard_negative import HardNegativeSampler, nearest_chain
from plugins.samplers.random import RandomSampler

GROUPS, PER_GROUP, DIM = 8, 32, 16


def grouped_embeddings(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """8 tight groups of 32 around random directions, the samples interleaved (sample i in group i % 8)."""
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(GROUPS, DIM, generator=generator), dim=-1)
    group = torch.arange(GROUPS * PER_GROUP) % GROUPS
    points = centres[group] + 0.05 * torch.randn(len(group), DIM, generator=generator)
    return F.normalize(points, dim=-1), group


def refreshed(**options) -> HardNegativeSampler:
    sampler = HardNegativeSampler(clusters=GROUPS, **options)
    sampler.refresh(grouped_embeddings()[0])
    return sampler


def test_kmeans_recovers_the_groups():
    points, group = grouped_embeddings()
    labels, centroids = spherical_kmeans(points, GROUPS, 10, seed=1)
    assert all(len(set(labels[group == g].tolist())) == 1 for g in range(GROUPS))
    assert len(set(labels.tolist())) == GROUPS
    assert torch.allclose(centroids.norm(dim=1), torch.ones(GROUPS))
    assert torch.equal(labels, spherical_kmeans(points, GROUPS, 10, seed=1)[0])


def test_each_batch_is_one_cluster_when_sizes_match():
    _, group = grouped_embeddings()
    sampler = refreshed()
    batches = sampler.batches(len(group), None, PER_GROUP, seed=0, epoch=0)
    assert len(batches) == GROUPS
    assert all(len({int(group[i]) for i in b}) == 1 for b in batches)  # every negative from the anchor's cluster
    assert sorted(i for b in batches for i in b) == list(range(len(group)))


def test_in_batch_negatives_are_harder_than_random():
    points, group = grouped_embeddings()

    def mean_similarity(batches):
        return sum(((points[b] @ points[b].T).sum() - len(b)) / (len(b) * (len(b) - 1)) for b in batches) / len(batches)

    hard = refreshed().batches(len(group), None, 16, seed=0, epoch=0)
    random = RandomSampler().batches(len(group), None, 16, seed=0, epoch=0)
    assert mean_similarity(hard) > 0.9 > 0.5 > mean_similarity(random)


def test_random_before_the_first_refresh():
    sampler = HardNegativeSampler()
    assert sampler.refresh_every == 100 and sampler.state_dict()["assignment"] is None
    assert sampler.batches(100, None, 10, 4, 2) == RandomSampler().batches(100, None, 10, 4, 2)
    check_sampler(HardNegativeSampler(), HardNegativeSampler)


def test_deterministic_ranks_and_resume_with_the_clusters():
    sampler = refreshed()
    n = GROUPS * PER_GROUP
    a = sampler.batches(n, None, 16, seed=1, epoch=3)
    assert a == refreshed().batches(n, None, 16, seed=1, epoch=3)
    assert a != sampler.batches(n, None, 16, seed=1, epoch=4) and a != sampler.batches(n, None, 16, seed=2, epoch=3)
    assert_ranks_disjoint(a, world=2, accum=2)
    # a fresh sampler never refreshed: the state alone reproduces the clustered batches
    assert_resumes(sampler, lambda: HardNegativeSampler(clusters=GROUPS), n, None, 16, at=5)
    with pytest.raises(UserError, match="clustered 256 samples, not 100"):
        sampler.batches(100, None, 10, 0, 0)


def test_chain_walks_to_the_nearest_centroid():
    centroids = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.5, 0.5]]), dim=-1)
    assert nearest_chain(centroids) == [0, 2, 3, 1]


def test_registration():
    assert_light("plugins.samplers")
    component = Registry.load().get("sampler", "hard-negative")
    assert component.declared == {"needs": set()}
    assert [(o.name, o.default) for o in component.options] == [("refresh_every", 100), ("clusters", 64),
                                                                ("iterations", 10)]
