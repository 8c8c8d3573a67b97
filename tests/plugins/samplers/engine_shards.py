"""What the engine does with a sampler's global batches, for the sampler tests: shard them across ranks,
and resume mid-epoch from ``state_dict``."""

import copy


def rank_shards(batches, world: int, accum: int = 1) -> list[list[list[int]]]:
    """Per rank, its micro-batches, cut from each global batch exactly as orchestrator/engine/train.py does."""
    micro = len(batches[0]) // (world * accum)
    return [[b[(a * world + rank) * micro:(a * world + rank + 1) * micro] for b in batches for a in range(accum)]
            for rank in range(world)]


def assert_ranks_disjoint(batches, world: int = 2, accum: int = 2) -> None:
    """Within every global batch the ranks' shards never overlap and together are the whole batch."""
    shards = rank_shards(batches, world, accum)
    for step, batch in enumerate(batches):
        parts = [i for rank in shards for i in sum(rank[step * accum:(step + 1) * accum], [])]
        assert len(parts) == len(set(parts)) == len(batch), f"ranks overlap in batch {step}"
        assert sorted(parts) == sorted(batch)


def assert_resumes(sampler, fresh, n, labels, batch_size, seed=3, epoch=2, at=1, prepare=None) -> None:
    """A ``fresh()`` sampler given ``sampler.state_dict()`` (and ``prepare``, as the engine's setup on a new
    start) gives the same batches from position ``at`` of the epoch on, and the same next epoch."""
    before = sampler.batches(n, labels, batch_size, seed, epoch)
    state = copy.deepcopy(sampler.state_dict())
    other = fresh()
    if prepare is not None:
        prepare(other)
    other.load_state_dict(state)
    assert other.batches(n, labels, batch_size, seed, epoch)[at:] == before[at:]
    assert other.batches(n, labels, batch_size, seed, epoch + 1) == sampler.batches(n, labels, batch_size, seed,
                                                                                    epoch + 1)
