"""A run checkpointed on one number of processes resumes on another (`orch resume RUN --gpus N`) and ends where
an uninterrupted run on the new number ends.

The run crashes after its step-3 checkpoint (the `faulty` test loss, once), has no attempts left, and is resumed
on the other count. ZeRO-0 (fp32) keeps the whole optimizer state in one file and loads as it is; ZeRO-2
partitions it over the ranks, so the resume converts the checkpoint once into a universal one
(`TAG/universal`, DeepSpeed's ds_to_universal). The sampler yields global batches, so the data order is the
same at any count.

Tolerance 1e-4 on the loss, as in test_zero2_equivalence: the runs differ only in fp32 summation order (one
rank or two; measured: equal to 1e-6). A resume that lost the optimizer state (Adam's moments, its step count)
or the data position is off by far more.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orchestrator.engine.checkpoint import load_rank_state, needs_universal, saved_world_size, write_manifest
from orchestrator.store import Store
from tests.conftest import orch
from tests.engine.conftest import SMALL

TOLERANCE = 1e-4


def _losses(store: Store, run_id: int) -> list[float]:
    return [m["value"] for m in store.metrics(run_id) if m["name"] == "train/loss"]


@pytest.mark.slow
@pytest.mark.parametrize(("zero", "before", "after"), [("0", 2, 1), ("2", 2, 1), ("2", 1, 2)])
def test_a_run_resumes_on_another_number_of_processes(workdir: Path, faulty_site: dict[str, str],
                                                      uninterrupted: Callable[..., dict[str, Any]], zero: str,
                                                      before: int, after: int) -> None:
    loss = f"faulty:mode=crash-once,at_step=5,marker={workdir / 'crashed'}"
    crashed = orch("run", *SMALL, "--zero", zero, "--gpus", str(before), "--loss", loss, "--max-attempts", "1",
                   cwd=workdir, env=faulty_site)
    first_log = (workdir / "runs" / "1" / "attempt-1.log").read_text()
    assert "injected crash at step 5" in first_log, crashed.stdout + crashed.stderr + first_log[-3000:]
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    assert store.run(1)["status"] == "failed" and store.latest_checkpoint(1)["step"] == 3
    hash_before = store.run(1)["spec_hash"]

    resumed = orch("resume", "1", "--gpus", str(after), cwd=workdir, env=faulty_site)
    assert resumed.returncode == 0 and f"from step 3 on {after} process(es)" in resumed.stdout, resumed.stderr
    assert orch("worker", "--quiet", cwd=workdir, env=faulty_site).returncode == 0
    run = store.run(1)
    assert run["status"] == "finished", run["error"]
    assert run["spec"]["trainer"]["gpus"] == after and run["spec_hash"] == hash_before  # the same experiment
    log = (workdir / "runs" / "1" / "attempt-2.log").read_text()
    assert ("through a universal checkpoint" in log) == (zero == "2"), log[-3000:]

    # The reference runs on `after` processes from the start and never crashes: the same run with the built-in
    # infonce, which the faulty loss is until it injects its fault (shared with test_zero2_equivalence).
    reference = uninterrupted("--zero", zero, "--gpus", str(after))
    assert reference["trainer"]["gpus"] == after and reference["trainer"]["zero"] == int(zero)
    assert [m["step"] for m in store.metrics(1) if m["name"] == "train/loss"] == [1, 2, 3, 4, 5, 6]  # no duplicates
    assert reference["steps"] == [1, 2, 3, 4, 5, 6]
    assert _losses(store, 1) == pytest.approx(reference["losses"], abs=TOLERANCE)


def test_resume_refuses_a_process_count_that_does_not_divide_the_batch(workdir: Path) -> None:
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    from orchestrator.registry import Registry
    from orchestrator.spec import resolve_run

    spec = resolve_run(Registry.load(), {}, {"batch_size": "64"})
    (run_id,) = store.add_runs([(spec, "0" * 64, "r")])
    store.cancel(run_id)
    result = orch("resume", str(run_id), "--gpus", "3", cwd=workdir)
    assert result.returncode == 2 and "not divisible by --gpus x --accum = 3" in result.stderr
    assert store.run(run_id)["status"] == "cancelled" and store.run(run_id)["spec"]["trainer"]["gpus"] == 1


def test_a_checkpoint_knows_its_world_size_and_new_ranks_get_a_rank_state(tmp_path: Path) -> None:
    import torch

    for rank, loss in enumerate((1.0, 3.0)):
        torch.save({"rng": {"rank": rank}, "interval": {"loss": torch.tensor(loss)}, "interval_steps": 2},
                   tmp_path / f"rank{rank}.pt")
    torch.save({}, tmp_path / "mp_rank_00_model_states.pt")
    assert saved_world_size(tmp_path) == 2  # older checkpoints: one rankN.pt per rank
    write_manifest(tmp_path, world_size=2)
    assert saved_world_size(tmp_path) == 2
    assert not needs_universal(tmp_path, 1)  # ZeRO-0 fp32: the whole optimizer state is in the model states
    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert needs_universal(tmp_path, 1) and needs_universal(tmp_path, 4) and not needs_universal(tmp_path, 2)

    one = load_rank_state(tmp_path, 0, 1)  # 2 -> 1: rank 0's RNG, the mean of the unlogged sums
    assert one["rng"] == {"rank": 0} and one["interval"]["loss"].item() == 2.0 and one["interval_steps"] == 2
    three = [load_rank_state(tmp_path, r, 3) for r in range(3)]  # 2 -> 3: rank 2 has no file of its own
    assert [s["rng"]["rank"] for s in three] == [0, 1, 0]
    assert all(s["interval"]["loss"].item() == 2.0 for s in three)
    assert load_rank_state(tmp_path, 1, 2)["interval"]["loss"].item() == 3.0  # same world size: its own file
