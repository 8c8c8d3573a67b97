"""class-balanced: m samples of each of batch_size / m classes (PK sampling)."""

from collections import Counter

import pytest
from engine_shards import assert_ranks_disjoint, assert_resumes

from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.testing import assert_light, check_sampler
from plugins.samplers.class_balanced import ClassBalancedSampler

LABELS = [i % 10 for i in range(400)] + [10, 10]  # 10 classes of 40, and a class of 2 (< m: never drawn)


def test_m_per_class_and_distinct_classes():
    batches = ClassBalancedSampler(m=4).batches(len(LABELS), LABELS, 16, seed=0, epoch=0)
    assert len(batches) == len(LABELS) // 16
    for batch in batches:
        counts = Counter(LABELS[i] for i in batch)
        assert len(counts) == 4 and set(counts.values()) == {4}
        assert len(set(batch)) == 16 and 10 not in counts
    used = Counter(i for b in batches for i in b)
    assert max(used.values()) <= 2  # each class streams through its samples before repeating one


def test_deterministic_and_seeded():
    s = ClassBalancedSampler(m=2)
    a = s.batches(len(LABELS), LABELS, 8, seed=1, epoch=3)
    assert a == ClassBalancedSampler(m=2).batches(len(LABELS), LABELS, 8, seed=1, epoch=3)
    assert a != s.batches(len(LABELS), LABELS, 8, seed=1, epoch=4)
    assert a != s.batches(len(LABELS), LABELS, 8, seed=2, epoch=3)
    check_sampler(ClassBalancedSampler(m=2), lambda: ClassBalancedSampler(m=2), n=37, batch_size=6)


def test_a_class_stream_wrapping_inside_a_batch_never_repeats_a_sample():
    labels = [c for c in range(4) for _ in range(5)]  # m=4 of 5: a class drawn twice wraps in its second chunk
    for seed in range(20):
        for batch in ClassBalancedSampler(m=4).batches(20, labels, 8, seed=seed, epoch=0):
            assert len(set(batch)) == 8


def test_ranks_never_overlap_and_resume():
    s = ClassBalancedSampler(m=4)
    assert_ranks_disjoint(s.batches(len(LABELS), LABELS, 16, seed=0, epoch=1), world=2, accum=2)
    assert_resumes(s, lambda: ClassBalancedSampler(m=4), len(LABELS), LABELS, 16, at=5)


def test_clear_errors():
    with pytest.raises(UserError, match="not divisible by m=4"):
        ClassBalancedSampler(m=4).batches(400, LABELS, 10, 0, 0)
    with pytest.raises(UserError, match="at most 40"):
        ClassBalancedSampler(m=4).batches(len(LABELS), LABELS, 48, 0, 0)
    with pytest.raises(UserError, match="needs labels"):
        ClassBalancedSampler().batches(10, None, 8, 0, 0)


def test_registration():
    assert_light("plugins.samplers")
    component = Registry.load().get("sampler", "class-balanced")
    assert component.declared == {"needs": {"label"}}
    assert [(o.name, o.default) for o in component.options] == [("m", 4)]
