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
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.store import Store
from tests.conftest import orch

pytestmark = pytest.mark.slow

SMALL = ["--encoder", "vit:depth=1,width=64,embed_dim=64", "--text-encoder",
         "text-transformer:depth=1,width=64,embed_dim=64", "--batch-size", "64", "--steps", "6", "--log-every", "1",
         "--checkpoint-every", "0", "--eval", "zs:split=test", "--quiet"]
TOLERANCE = 1e-4


def loss_curve(store: Store, run_id: int) -> list[float]:
    return [m["value"] for m in store.metrics(run_id) if m["name"] == "train/loss"]


def test_zero2_on_two_processes_follows_one_process_with_twice_the_micro_batch(workdir: Path) -> None:
    for gpus in ("2", "1"):
        result = orch("run", *SMALL, "--zero", "2", "--gpus", gpus, cwd=workdir)
        assert result.returncode == 0, result.stdout + result.stderr
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    assert [store.run(i)["spec"]["trainer"]["gpus"] for i in (1, 2)] == [2, 1]
    two, one = loss_curve(store, 1), loss_curve(store, 2)
    assert len(two) == len(one) == 6
    assert two[-1] < two[0] - 0.05  # it learns: the curve is worth comparing
    assert two == pytest.approx(one, abs=TOLERANCE)
