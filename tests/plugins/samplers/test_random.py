"""The built-in random sampler: deterministic per (seed, epoch), a permutation per epoch, drop_last."""


from orchestrator.registry import Registry
from orchestrator.testing import assert_light
from plugins.samplers.random import RandomSampler


def test_deterministic_from_seed_and_epoch():
    a, b = RandomSampler(), RandomSampler()
    assert a.batches(100, None, 10, seed=1, epoch=3) == b.batches(100, None, 10, seed=1, epoch=3)
    b.batches(100, None, 10, seed=1, epoch=0)  # no hidden state: earlier epochs change nothing
    assert a.batches(100, None, 10, seed=1, epoch=3) == b.batches(100, None, 10, seed=1, epoch=3)


def test_epochs_and_seeds_differ():
    s = RandomSampler()
    e0 = s.batches(100, None, 10, seed=1, epoch=0)
    assert e0 != s.batches(100, None, 10, seed=1, epoch=1)
    assert e0 != s.batches(100, None, 10, seed=2, epoch=0)
    assert s.batches(100, None, 10, seed=0, epoch=1) != s.batches(100, None, 10, seed=1, epoch=0)
    assert [i for b in e0 for i in b] != list(range(100))  # shuffled


def test_every_index_once_per_epoch():
    batches = RandomSampler().batches(96, [0] * 96, 8, seed=5, epoch=2)
    assert len(batches) == 12 and all(len(b) == 8 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(96))
    assert all(isinstance(i, int) for b in batches for i in b)


def test_drop_last():
    dropped = RandomSampler(drop_last=True).batches(23, None, 5, seed=0, epoch=0)
    assert [len(b) for b in dropped] == [5, 5, 5, 5]
    assert len({i for b in dropped for i in b}) == 20
    kept = RandomSampler(drop_last=False).batches(23, None, 5, seed=0, epoch=0)
    assert [len(b) for b in kept] == [5, 5, 5, 5, 3]
    assert sorted(i for b in kept for i in b) == list(range(23))
    assert kept[:4] == dropped  # the same permutation either way
    assert RandomSampler().batches(3, None, 5, seed=0, epoch=0) == []


def test_state_round_trip():
    s = RandomSampler()
    state = s.state_dict()
    assert state == {}
    s.load_state_dict(state)


def test_registration_imports_no_torch():
    assert_light("plugins.samplers")
    sampler = Registry.load().get("sampler", "random")
    assert [(o.name, o.default) for o in sampler.options] == [("drop_last", True)]
    assert sampler.declared == {"needs": set()}
