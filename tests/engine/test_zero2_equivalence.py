"""Data parallelism changes nothing but the fp32 summation order: a ZeRO-2 run on 2 gloo processes and a run on
1 process with twice the micro-batch (the same global batch of 64) follow the same loss curve.

Real runs: `orch run` launches torchrun, DeepSpeed partitions the optimizer state and gradients over the two
ranks (reduce-scatter, all-gather), InfoNCE gathers the embeddings of both ranks with gradients.

Tolerance 1e-4 on a loss of about 4: both runs compute the same sums, but in another order (2 ranks: two
half-batch partial gradients averaged by a reduction, the logits against gathered embeddings; 1 rank: one
full-batch matmul), so gradients agree to a few 1e-7 relative, and the curves measured here agree to 1e-6.
AdamW's first updates are close to lr x sign(gradient), which could turn a flipped near-zero gradient component
into a parameter move of up to 2 lr: 1e-4 leaves room for that and is still a hundred times smaller than what a
sharding bug (a rank training on the wrong half, a loss missing the other rank's negatives, gradients summed
instead of averaged) does to the loss.

The two runs (tests/engine/conftest.py's SMALL, checkpointed at steps 3 and 6) are the uninterrupted references
of test_resume_world_size too: each is trained once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4


def test_zero2_on_two_processes_follows_one_process_with_twice_the_micro_batch(
        uninterrupted: Callable[..., dict[str, Any]]) -> None:
    two, one = uninterrupted("--zero", "2", "--gpus", "2"), uninterrupted("--zero", "2", "--gpus", "1")
    assert [two["trainer"]["gpus"], one["trainer"]["gpus"]] == [2, 1]
    two, one = two["losses"], one["losses"]
    assert len(two) == len(one) == 6
    assert two[-1] < two[0] - 0.05  # it learns: the curve is worth comparing
    assert two == pytest.approx(one, abs=TOLERANCE)


def test_deepspeed_keys_from_the_command_line_reach_every_rank(uninterrupted: Callable[..., dict[str, Any]]) -> None:
    """``--deepspeed`` keys reach both ranks' engines: ZeRO-2 reducing in small buckets overlapped with the backward
    pass, in fp16. Reducing in fp16 rounds the averaged gradients, so the curve moves off the fp32 one, by little
    (measured: 3e-5); with the keys dropped on the way it would be the fp32 curve exactly."""
    keys = "zero_optimization.overlap_comm=true,zero_optimization.reduce_bucket_size=20000,communication_data_type=fp16"
    fp16_reduce = uninterrupted("--zero", "2", "--gpus", "2", "--deepspeed", keys)
    assert fp16_reduce["trainer"]["deepspeed"] == {"zero_optimization": {"overlap_comm": True,
                                                                         "reduce_bucket_size": 20000},
                                                   "communication_data_type": "fp16"}
    fp32_reduce = uninterrupted("--zero", "2", "--gpus", "2")["losses"]
    assert fp16_reduce["losses"] != fp32_reduce
    assert fp16_reduce["losses"] == pytest.approx(fp32_reduce, abs=1e-3)
