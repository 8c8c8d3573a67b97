"""The per-step stop vote of ``engine/train.py``: every rank learns of any rank's stop request at the same step."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from orchestrator.engine.train import StopVote
from orchestrator.testing import leave_rank
from tests.conftest import free_port

ASKS = {0: set(), 1: {4}}  # rank 1 is asked during step 4 (0-based) and only then; rank 0 never


def _vote_rank(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    dist.init_process_group("gloo")
    votes = StopVote(torch.device("cpu"), world)
    decisions = []
    for step in range(12):
        time.sleep(0.01 * rank)  # rank 0 runs ahead, as a rank with less to do would
        decisions.append(votes.cast(step in ASKS[rank]))
    votes.drain()
    Path(out, f"rank{rank}.json").write_text(json.dumps(decisions))
    leave_rank()


def test_every_rank_stops_at_the_same_step_two_steps_after_any_rank_is_asked(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_vote_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = [step - StopVote.LAG in ASKS[1] for step in range(12)]
    assert expected.index(True) == 6
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == expected, rank


def test_a_lone_rank_stops_at_once() -> None:
    votes = StopVote(torch.device("cpu"), 1)
    assert [votes.cast(asked) for asked in (False, True, False)] == [False, True, False]
