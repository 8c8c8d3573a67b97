"""Faults injected into real runs: non-finite loss, crashes, OOM, damaged checkpoints, a full disk, a
tracker outage. Each run is real (DeepSpeed launched as the worker launches it, a real store, a real MLflow
server)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.runinfo import TIMING_METRICS
from orchestrator.store import Store
from tests.conftest import free_port, orch

pytestmark = pytest.mark.slow
SMALL = ["--encoder", "vit:depth=1,width=64,embed_dim=64", "--text-encoder",
         "text-transformer:depth=1,width=64,embed_dim=64", "--batch-size", "64", "--eval", "zs"]


def _store(workdir: Path) -> Store:
    return Store.open(f"sqlite:///{workdir}/experiments.db")


def test_non_finite_loss_stops_with_its_reason_and_keeps_the_checkpoint(workdir: Path, faulty_site) -> None:
    result = orch("run", *SMALL, "--loss", "faulty:mode=nan,at_step=8", "--steps", "20", "--checkpoint-every", "5",
                  "--log-every", "5", "--quiet", cwd=workdir, env=faulty_site)
    assert result.returncode == 2
    run = _store(workdir).run(1)
    assert run["status"] == "failed"
    assert run["error"].startswith("non-finite") and "loss=nan" in run["error"]
    assert "between steps 6 and 10" in run["error"]
    assert [a["outcome"] for a in _store(workdir).attempts(1)] == ["failed"]  # not retried: it would fail again
    assert _store(workdir).latest_checkpoint(1)["step"] == 5


def test_gpu_out_of_memory_says_what_to_change(workdir: Path, faulty_site) -> None:
    orch("run", *SMALL, "--loss", "faulty:mode=oom,at_step=2", "--steps", "4", "--quiet", cwd=workdir, env=faulty_site)
    error = _store(workdir).run(1)["error"]
    assert "out of GPU memory" in error and "--accum" in error and "--zero" in error


def test_a_failure_on_one_rank_alone_fails_the_run_with_that_ranks_reason(workdir: Path, faulty_site) -> None:
    """Out of memory on one GPU of several (or a file missing on one node): the run fails once, with the reason
    the failing rank gave, rather than crashing without one and being retried into the same failure."""
    result = orch("run", *SMALL, "--loss", "faulty:mode=oom,at_step=2,rank=1", "--gpus", "2", "--steps", "4",
                  "--quiet", cwd=workdir, env=faulty_site)
    assert result.returncode == 2, result.stdout + result.stderr
    store = _store(workdir)
    run = store.run(1)
    assert run["status"] == "failed" and run["error"].startswith("rank 1: out of GPU memory"), run["error"]
    assert [a["outcome"] for a in store.attempts(1)] == ["failed"]


@pytest.mark.parametrize(("fault", "gpus", "says", "out_of_memory"), [
    ("kill,rank=1", "2", "rank 1 was killed by SIGKILL", True),
    ("kill", "1", "the training process was killed by SIGKILL", True),
    ("kill-loader", "1", "DataLoader worker", True),
    ("crash,rank=1", "2", "RuntimeError: injected crash at step 2", False),
])
def test_a_crash_names_the_process_that_failed_first_and_why(workdir: Path, faulty_site, fault: str, gpus: str,
                                                             says: str, out_of_memory: bool) -> None:
    """SIGKILL from outside (the kernel's out-of-memory killer) to a rank or a loader worker, or an exception on one
    rank of two: the run's error names what failed first and, for SIGKILL, the likely cause; not the broken
    connection the other rank then reports, nor the last line of the log."""
    result = orch("run", *SMALL, "--loss", f"faulty:mode={fault},at_step=2", "--gpus", gpus, "--workers", "1",
                  "--steps", "4", "--max-attempts", "1", "--quiet", cwd=workdir, env=faulty_site, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    error = _store(workdir).run(1)["error"]
    assert says in error, error
    assert ("out-of-memory killer" in error and "--workers" in error) == out_of_memory, error


def test_a_crash_is_retried_and_resumes_from_the_checkpoint(workdir: Path, faulty_site) -> None:
    """With a loader worker: the crashed rank exits with its loader alive (the traceback holds it), and Python's
    exit must stop the worker rather than wait for it for ever."""
    marker = workdir / "crashed-once"
    result = orch("run", *SMALL, "--loss", f"faulty:mode=crash-once,at_step=12,marker={marker}", "--steps", "16",
                  "--checkpoint-every", "5", "--workers", "1", "--quiet", cwd=workdir, env=faulty_site, timeout=300)
    assert result.returncode == 0, result.stdout
    assert "injected crash at step 12" in result.stdout and "will be retried" in result.stdout
    store = _store(workdir)
    assert [a["outcome"] for a in store.attempts(1)] == ["crashed", "finished"]
    assert "resuming from step 10" in (workdir / "runs" / "1" / "attempt-2.log").read_text() or \
        "resuming from step 10" in result.stdout


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_hung_attempt_is_stopped_with_its_stacks_and_resumed(workdir: Path, faulty_site, ranks: int) -> None:
    """--stall-timeout: a rank that hangs for ever, as a read from a stalled network file system does, is stopped
    once no sign of progress came for the timeout; every rank wrote its Python stack to the log first (of 2 ranks,
    rank 1 hangs in the loss and rank 0 waits for it), and the next attempt resumes from the checkpoint."""
    marker = workdir / "hung-once"
    result = orch("run", *SMALL, "--loss", f"faulty:mode=hang-once,at_step=7,marker={marker},rank={ranks - 1}",
                  "--steps", "10", "--checkpoint-every", "5", "--gpus", str(ranks), "--stall-timeout", "20", "--quiet",
                  cwd=workdir, env=faulty_site, timeout=300)
    assert result.returncode == 0, result.stdout
    assert "no sign of progress for 20 s (--stall-timeout); stopping it" in result.stdout
    attempts = _store(workdir).attempts(1)
    assert [a["outcome"] for a in attempts] == ["crashed", "finished"]
    assert "gave no sign of progress for 20 s (--stall-timeout)" in attempts[0]["error"]
    log = (workdir / "runs" / "1" / "attempt-1.log").read_text()
    assert log.count("Timeout (0:00:20)!") >= ranks, log[-3000:]  # more when a start-up phase was that slow
    assert re.search(r'orch_faulty_plugin/loss\.py", line \d+ in forward', log), log[-3000:]
    assert ranks == 1 or re.search(r'distributed_c10d\.py", line \d+ in all_reduce', log), log[-3000:]  # rank 0
    assert "resuming from step 5" in result.stdout


def test_a_rank_that_dies_at_exit_after_the_run_finished_does_not_rerun_it(workdir: Path, faulty_site) -> None:
    """The last rank aborts while its interpreter shuts down (as gloo's threads can): the launcher exits non-zero,
    but every rank had passed the final barrier, so the run is finished once, not crashed and retrained."""
    result = orch("run", *SMALL, "--loss", "faulty:mode=abort-at-exit,at_step=2", "--gpus", "2", "--steps", "4",
                  "--quiet", cwd=workdir, env=faulty_site)
    assert result.returncode == 0, result.stdout
    assert "after the run had finished; nothing was lost" in result.stdout
    store = _store(workdir)
    assert store.run(1)["status"] == "finished"
    assert [a["outcome"] for a in store.attempts(1)] == ["finished"]
    assert (workdir / "runs" / "1" / "final" / "weights.pt").exists()


def test_a_run_that_keeps_crashing_fails_after_max_attempts_and_resume_brings_it_back(workdir: Path,
                                                                                      faulty_site) -> None:
    result = orch("run", *SMALL, "--loss", "faulty:mode=crash,at_step=2", "--steps", "4", "--max-attempts", "2",
                  "--quiet", cwd=workdir, env=faulty_site)
    assert result.returncode == 1
    store = _store(workdir)
    run = store.run(1)
    assert run["status"] == "failed" and "injected crash" in run["error"]
    assert [a["outcome"] for a in store.attempts(1)] == ["crashed", "crashed"]
    assert orch("resume", "1", cwd=workdir, env=faulty_site).returncode == 0
    assert store.run(1)["status"] == "queued"


def test_damaged_checkpoint_is_detected_and_the_previous_one_used(workdir: Path, faulty_site) -> None:
    marker = workdir / "crashed-once"
    spec = [*SMALL, "--steps", "20", "--checkpoint-every", "5", "--log-every", "5"]
    failed = orch("run", *spec, "--loss", f"faulty:mode=crash-once,at_step=17,marker={marker}", "--max-attempts", "1",
                  "--quiet", cwd=workdir, env=faulty_site)
    assert failed.returncode == 1
    store = _store(workdir)
    latest = Path(store.latest_checkpoint(1)["path"])
    assert latest.name == "step-00000015"
    victim = max((p for p in latest.rglob("*.pt")), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a torn write

    assert orch("resume", "1", cwd=workdir).returncode == 0
    resumed = orch("worker", "--quiet", cwd=workdir, env=faulty_site)
    assert "checkpoint at step 15 is damaged" in resumed.stdout and "truncated" in resumed.stdout
    assert "resuming from step 10" in resumed.stdout
    assert store.run(1)["status"] == "finished"

    clean = orch("run", *spec, "--loss", "faulty:mode=ok", "--quiet", cwd=workdir, env=faulty_site)
    assert clean.returncode == 0
    assert {k: v for k, v in store.final_metrics(1).items() if k not in TIMING_METRICS} == \
        {k: v for k, v in store.final_metrics(2).items() if k not in TIMING_METRICS}


def test_disk_full_while_checkpointing_stops_cleanly(workdir: Path) -> None:
    runs = workdir / "small-disk"
    runs.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1700k", "tmpfs", str(runs)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        result = orch("--runs-dir", str(runs), "run", *SMALL, "--steps", "12", "--checkpoint-every", "4", "--quiet",
                      cwd=workdir)
        store = _store(workdir)
        run = store.run(1)
        assert result.returncode == 2 and run["status"] == "failed"
        assert run["error"].startswith("disk full while writing checkpoint step 8")
        kept = store.latest_checkpoint(1)
        assert kept["step"] == 4
        from orchestrator.engine.checkpoint import verify

        assert verify(Path(kept["path"])) is None  # the previous checkpoint is whole
        assert not (runs / "1" / "checkpoints" / "step-00000008").exists()
    finally:
        subprocess.run(["umount", str(runs)], capture_output=True)


def test_tracker_outage_loses_nothing_and_sync_catches_up(workdir: Path) -> None:
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2",
           "ORCH_MLFLOW_END_TIMEOUT": "5"}
    result = orch("run", *SMALL, "--steps", "10", "--log-every", "2", "--quiet", cwd=workdir, env=env)
    assert result.returncode == 0, result.stdout + result.stderr  # training went on without its tracker
    store = _store(workdir)
    stored = store.metrics(1)
    assert {m["step"] for m in stored if m["name"] == "train/loss"} == {2, 4, 6, 8, 10}

    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"sqlite:///{workdir}/mlflow-server.db",
                               "--default-artifact-root", str(workdir / "artifacts")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(1)
        synced = orch("sync", "1", cwd=workdir, env={**env, "ORCH_MLFLOW_END_TIMEOUT": "120"})
        assert synced.returncode == 0 and "replayed 5 logged steps" in synced.stdout, synced.stdout + synced.stderr
        assert "failed" not in synced.stderr
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        (found,) = client.search_runs(client.get_experiment_by_name("orch").experiment_id)
        assert found.info.status == "FINISHED"
        history = client.get_metric_history(found.info.run_id, "train/loss")
        assert sorted(m.step for m in history) == [2, 4, 6, 8, 10]
        losses = {m["step"]: m["value"] for m in stored if m["name"] == "train/loss"}
        assert {m.step: m.value for m in history} == losses
        assert json.loads(client.get_run(found.info.run_id).data.params["trainer.steps"]) == 10
    finally:
        server.terminate()
        server.wait(timeout=30)
