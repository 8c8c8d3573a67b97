"""The per-step stop check of ``engine/train.py``: what a rank counts as a stop request (``StopAsked``), and the vote
by which every rank learns of any rank's request at the same step (``StopVote``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from orchestrator.engine.train import StopAsked, StopVote, _signalled
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


def test_rank_0_looks_for_the_stop_file_at_most_every_fifth_of_a_second(tmp_path: Path) -> None:
    request = tmp_path / "attempt-1.stop"
    asked = StopAsked(request)
    assert not asked()
    request.touch()
    asked.looked = time.monotonic()  # looked just now: the file waits for the next look
    assert not asked()
    asked.looked -= 0.2
    assert asked()
    assert not StopAsked(None)()  # other ranks never look


def test_sigterm_to_a_rank_is_a_request_on_every_rank(tmp_path: Path) -> None:
    _signalled.set()
    try:
        assert StopAsked(None)() and StopAsked(tmp_path / "attempt-1.stop")()
    finally:
        _signalled.clear()
