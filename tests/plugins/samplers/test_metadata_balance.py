"""metadata-balance: MetaCLIP's substring matching and per-entry cap t, a new subset each epoch."""

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from engine_shards import assert_ranks_disjoint, assert_resumes

from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.testing import assert_light, check_sampler
from plugins.datasets.mnist import MNIST
from plugins.samplers.metadata_balance import MetadataBalanceSampler, keep_probabilities

# a long-tailed pool: 600 cats, 100 dogs, 30 birds, 20 with both cat and dog, 50 matching nothing
CAPTIONS = (["a Cat on a mat"] * 600 + ["a dog"] * 100 + ["a bird in flight"] * 30 + ["cat and dog"] * 20
            + ["a landscape"] * 50)
SPLIT = SimpleNamespace(captions=CAPTIONS)
ENTRIES = ("cat", "dog", "bird")


def balanced(t: int = 50) -> MetadataBalanceSampler:
    sampler = MetadataBalanceSampler(entries=ENTRIES, t=t)
    sampler.setup(SPLIT)
    return sampler


def test_matching_and_the_papers_keep_probabilities():
    sampler = balanced()
    assert sampler.matches[0] == [0] and sampler.matches[650] == [1] and sampler.matches[720] == [2]
    assert sampler.matches[740] == [0, 1] and sampler.matches[760] == []  # case-insensitive substrings
    keep = sampler.keep(len(CAPTIONS), None)
    assert sampler.counts == [620, 120, 30]
    p_cat, p_dog = 50 / 620, 50 / 120
    assert keep[0].item() == pytest.approx(p_cat) and keep[650].item() == pytest.approx(p_dog)
    assert keep[720].item() == 1.0 and keep[760].item() == 0.0  # tail entries whole; no match, never
    assert keep[740].item() == pytest.approx(1 - (1 - p_cat) * (1 - p_dog))


def test_caps_are_respected_in_expectation_and_tails_kept():
    sampler = balanced(t=50)
    per_entry = Counter()
    epochs = 40
    for epoch in range(epochs):
        kept = [i for b in sampler.batches(len(CAPTIONS), None, 1, seed=0, epoch=epoch) for i in b]
        assert len(kept) == len(set(kept))
        for i in kept:
            per_entry.update(sampler.matches[i])
        assert not any(i >= 750 for i in kept)  # unmatched samples are dropped
        assert all(i in kept for i in range(720, 750) if sampler.matches[i] == [2])  # birds: 30 < t, all kept
    # expected per epoch: cat 600 p_cat + 20 p_both = 57.7, dog 100 p_dog + 20 p_both = 50.9: near t = 50
    # (a sample kept for one entry also counts for the other, as in the paper)
    assert 50 < per_entry[0] / epochs < 66 and 43 < per_entry[1] / epochs < 59
    assert per_entry[2] / epochs == 30


def test_classes_are_entries_without_entries():
    labels = [0] * 400 + [1] * 40
    sampler = MetadataBalanceSampler(t=40)
    batches = sampler.batches(len(labels), labels, 8, seed=0, epoch=0)
    counts = Counter(labels[i] for b in batches for i in b)
    assert sampler.counts == [400, 40] and counts[1] <= 40 and 20 < counts[0] < 65
    with pytest.raises(UserError, match="needs labels"):
        MetadataBalanceSampler().batches(10, None, 2, 0, 0)


def test_mnist_captions_match_digit_entries():
    data = MNIST()
    sampler = MetadataBalanceSampler(entries=tuple(f'"{d}"' for d in range(10)), t=100)
    sampler.setup(data.train)
    assert sampler.keep(len(data.train), None).tolist() == [0.25] * len(data.train)  # 400 per digit, t=100
    assert [m[0] for m in sampler.matches] == data.train.labels


def test_deterministic_ranks_and_resume():
    sampler = balanced()
    n = len(CAPTIONS)
    a = sampler.batches(n, None, 8, seed=1, epoch=3)
    assert a == balanced().batches(n, None, 8, seed=1, epoch=3)
    assert a != sampler.batches(n, None, 8, seed=1, epoch=4) and a != sampler.batches(n, None, 8, seed=2, epoch=3)
    assert all(len(b) == 8 for b in a)
    assert_ranks_disjoint(a, world=2, accum=2)
    assert_resumes(sampler, lambda: MetadataBalanceSampler(entries=ENTRIES, t=50), n, None, 8, at=3,
                   prepare=lambda s: s.setup(SPLIT))
    check_sampler(MetadataBalanceSampler(t=5), lambda: MetadataBalanceSampler(t=5), n=60, batch_size=4)


def test_clear_errors():
    with pytest.raises(RuntimeError, match="needs setup"):
        MetadataBalanceSampler(entries=ENTRIES).batches(10, None, 2, 0, 0)
    with pytest.raises(UserError, match="no caption contains"):
        MetadataBalanceSampler(entries=("zebra",)).setup(SPLIT)
    with pytest.raises(UserError, match="empty"):
        MetadataBalanceSampler(entries=("",))


def test_registration():
    assert_light("plugins.samplers")
    component = Registry.load().get("sampler", "metadata-balance")
    assert component.declared == {"needs": {"text"}}
    assert [(o.name, o.default) for o in component.options] == [("entries", ()), ("t", 100)]
    assert torch.equal(keep_probabilities([[0], [0], [1]], 3, 1)[0], torch.tensor([0.5, 0.5, 1.0],
                                                                                  dtype=torch.float64))
