"""unique-class: no two samples of one class in a batch."""

from collections import Counter

import pytest
from engine_shards import assert_ranks_disjoint, assert_resumes

from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.testing import assert_light, check_sampler
from plugins.samplers.unique_class import UniqueClassSampler

LABELS = [i % 10 for i in range(400)]


def test_classes_are_unique_and_the_epoch_uses_every_sample():
    batches = UniqueClassSampler().batches(400, LABELS, 10, seed=0, epoch=0)
    assert len(batches) == 40  # 10 balanced classes: every batch holds one of each, every sample once
    assert sorted(i for b in batches for i in b) == list(range(400))
    assert all(len({LABELS[i] for i in b}) == 10 for b in batches)


def test_unbalanced_classes_empty_together():
    labels = [0] * 100 + [1] * 50 + [2] * 50 + [3] * 20 + [4] * 20
    batches = UniqueClassSampler().batches(len(labels), labels, 4, seed=0, epoch=0)
    assert all(len({labels[i] for i in b}) == 4 for b in batches)
    assert len({i for b in batches for i in b}) == 4 * len(batches)
    assert len(batches) == 40  # the most possible: 4 classes per batch need 40 + 40 + 40 + 20 + 20 samples
    assert Counter(labels[i] for b in batches for i in b) == {0: 40, 1: 40, 2: 40, 3: 20, 4: 20}


def test_deterministic_ranks_and_resume():
    s = UniqueClassSampler()
    a = s.batches(400, LABELS, 8, seed=1, epoch=3)
    assert a == UniqueClassSampler().batches(400, LABELS, 8, seed=1, epoch=3)
    assert a != s.batches(400, LABELS, 8, seed=1, epoch=4) and a != s.batches(400, LABELS, 8, seed=2, epoch=3)
    assert_ranks_disjoint(a, world=4, accum=2)
    assert_resumes(s, UniqueClassSampler, 400, LABELS, 8, at=7)
    check_sampler(UniqueClassSampler(), UniqueClassSampler, n=37, batch_size=3)


def test_impossible_batch_size_says_what_to_change():
    with pytest.raises(UserError, match="use --batch-size 10 or less"):
        UniqueClassSampler().batches(400, LABELS, 16, 0, 0)
    with pytest.raises(UserError, match="needs labels"):
        UniqueClassSampler().batches(400, None, 8, 0, 0)


def test_registration():
    assert_light("plugins.samplers")
    component = Registry.load().get("sampler", "unique-class")
    assert component.declared == {"needs": {"label"}} and component.options == []
