"""semantic-prune: DBP's concept-specific pruning of prototypical samples, SemDeDup, batches from the kept set."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_shards import assert_ranks_disjoint, assert_resumes

from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.testing import assert_light, check_sampler, resolve
from plugins.samplers.random import RandomSampler
from plugins.samplers.semantic_prune import ONCE, SemanticPruneSampler, cluster_quotas


def groups(radii=(0.02, 0.2, 0.1, 0.05), per_group: int = 100, dim: int = 16, seed: int = 0) -> torch.Tensor:
    """Groups around orthogonal directions, group g with spread radii[g]; sample i in group i % len(radii)."""
    generator = torch.Generator().manual_seed(seed)
    k = len(radii)
    group = torch.arange(k * per_group) % k
    noise = torch.randn(len(group), dim, generator=generator) * torch.tensor(radii)[group][:, None]
    return F.normalize(torch.eye(dim)[group] + noise, dim=-1)


def pruned(points: torch.Tensor, **options) -> SemanticPruneSampler:
    sampler = SemanticPruneSampler(**{"clusters": 4, "keep": 0.5, **options})
    sampler.refresh(points)
    return sampler


def test_the_most_prototypical_samples_of_each_cluster_go_first():
    points = groups()
    sampler = pruned(points)
    assert sampler.report["kept"] == len(sampler.kept) == 200 and sampler.report["clusters"] == 4
    kept = torch.zeros(len(points), dtype=torch.bool)
    kept[sampler.kept] = True
    for g in range(4):
        members = torch.arange(len(points))[torch.arange(len(points)) % 4 == g]
        centroid = F.normalize(points[members].mean(0), dim=0)
        similarity = points[members] @ centroid
        in_group = kept[members]
        if in_group.any() and (~in_group).any():  # every pruned member is closer to the centroid than any kept
            assert similarity[~in_group].min() >= similarity[in_group].max() - 1e-6


def test_dense_clusters_are_pruned_harder():
    points = groups()
    sampler = pruned(points)
    kept_per_group = np.bincount(np.asarray(sampler.kept) % 4, minlength=4)
    # spreads 0.02 < 0.05 < 0.1 < 0.2: the denser the concept, the fewer of its samples are kept
    assert kept_per_group[0] < kept_per_group[3] < kept_per_group[2] <= kept_per_group[1]
    assert kept_per_group.sum() == 200 and kept_per_group.max() <= 100


def test_quotas_water_fill_and_round():
    assert cluster_quotas(10, np.array([100, 100]), np.array([1.0, 1.0])).tolist() == [5, 5]
    # the first cluster would get 90 of 100 but has 20: the other 80 go to the rest in proportion
    assert cluster_quotas(100, np.array([20, 100, 100]), np.array([9.0, 0.5, 0.5])).tolist() == [20, 40, 40]
    assert cluster_quotas(7, np.array([3, 3, 3]), np.array([1.0, 1.0, 1.0])).sum() == 7
    assert cluster_quotas(50, np.array([3, 4]), np.array([1.0, 1.0])).tolist() == [3, 4]  # budget above the data


def test_semdedup_drops_near_duplicates():
    base = groups(per_group=25)
    points = torch.cat([base, base + 1e-4])  # every sample twice
    sampler = pruned(points, keep=1.0, dedup_eps=1e-4)
    assert sampler.report["deduplicated"] == 100 and len(sampler.kept) == 100
    assert sorted(i % 100 for i in sampler.kept) == list(range(100))  # one copy of each
    assert len(pruned(points, keep=1.0).kept) == 200  # without SemDeDup nothing goes at keep=1


def test_batches_come_from_the_kept_set_and_resume():
    sampler = pruned(groups())
    a = sampler.batches(400, None, 16, seed=1, epoch=3)
    assert len(a) == 200 // 16 and {i for b in a for i in b} <= set(sampler.kept)
    assert a == pruned(groups()).batches(400, None, 16, seed=1, epoch=3)
    assert a != sampler.batches(400, None, 16, seed=1, epoch=4) and a != sampler.batches(400, None, 16, seed=2, epoch=3)
    assert_ranks_disjoint(a, world=2, accum=2)
    assert_resumes(sampler, SemanticPruneSampler, 400, None, 16, at=4)  # the kept set travels in the state


def test_random_before_pruning_and_once_by_default():
    sampler = SemanticPruneSampler()
    assert sampler.refresh_every == ONCE and SemanticPruneSampler(reprune_every=500).refresh_every == 500
    assert sampler.batches(100, None, 10, 4, 2) == RandomSampler().batches(100, None, 10, 4, 2)
    check_sampler(SemanticPruneSampler(), SemanticPruneSampler)


@pytest.mark.parametrize("suffix", [".npy", ".pt"])
def test_precomputed_embeddings(tmp_path, suffix):
    points = groups()
    path = tmp_path / f"embeddings{suffix}"
    if suffix == ".npy":
        np.save(path, points.numpy())
    else:
        torch.save(points, path)
    sampler = SemanticPruneSampler(clusters=4, embeddings=path)
    assert sampler.refresh_every == 0  # the engine never refreshes it
    batches = sampler.batches(400, None, 10, seed=0, epoch=0)
    assert sampler.kept == pruned(points).kept and len(batches) == 20
    resolved = resolve("sampler", "semantic-prune", Registry.load(), embeddings=path)["options"]["embeddings"]
    assert resolved == str(path.absolute())
    with pytest.raises(UserError, match="want \\[300, D\\]"):
        SemanticPruneSampler(embeddings=path).batches(300, None, 10, 0, 0)


def test_registration(tmp_path):
    assert_light("plugins.samplers")
    with pytest.raises(UserError, match="not a .npy or .pt file"):
        resolve("sampler", "semantic-prune", Registry.load(), embeddings=tmp_path / "missing.npy")
    component = Registry.load().get("sampler", "semantic-prune")
    assert component.declared == {"needs": set()}
    assert [(o.name, o.default) for o in component.options] == [
        ("keep", 0.5), ("clusters", 50), ("iterations", 20), ("neighbours", 20), ("temperature", 0.1),
        ("dedup_eps", 0.0), ("embeddings", None), ("reprune_every", 0)]
