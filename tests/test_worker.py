"""Workers end to end: real DeepSpeed training processes, a real store, real SIGKILLs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from orchestrator.runinfo import TIMING_METRICS
from orchestrator.store import Claim, Store
from tests.conftest import imagenet_folder, install_module_plugin, orch, training_processes, wait_until

pytestmark = pytest.mark.slow

SMALL = ["--encoder", "vit:depth=1,width=64,embed_dim=64", "--text-encoder",
         "text-transformer:depth=1,width=64,embed_dim=64", "--batch-size", "64"]


def _comparable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in TIMING_METRICS}  # wall-clock, not results


# An image-image run with state everywhere: augmented views, an EMA teacher made by bind(), and a sampler
# whose batches come from clusters of the embeddings, refreshed between checkpoints.
VIEWS = ["--encoder", "vit:depth=1,width=64,embed_dim=64", "--loss", "byol", "--sampler",
         "hard-negative:refresh_every=25,clusters=8", "--batch-size", "64", "--eval", "knn"]


@pytest.mark.parametrize("components", [SMALL, VIEWS], ids=["infonce", "byol-views-hard-negative"])
def test_killed_worker_run_resumes_and_ends_like_an_uninterrupted_run(workdir: Path, components: list[str]) -> None:
    spec = [*components, "--steps", "60", "--checkpoint-every", "20", "--log-every", "10", "--eval-every", "30"]
    assert orch("queue", *spec, cwd=workdir).returncode == 0
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    worker = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker", "--lease", "4", "--quiet"],
                              cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: (store.latest_checkpoint(1) or {}).get("step", 0) >= 20
               and store.progress(1).get("step", 0) >= 30, 300, "a checkpoint and progress past it")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    wait_until(lambda: not training_processes(workdir / "runs" / "1"), 60, "the orphaned ranks to stop")
    assert store.run(1)["status"] == "running"  # nobody knows yet: the lease tells

    time.sleep(5)  # the dead worker's 4 s lease runs out
    resumed = orch("worker", "--quiet", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "lease expired" in resumed.stdout and "resuming from step" in resumed.stdout
    run = store.run(1)
    assert run["status"] == "finished"
    assert [a["outcome"] for a in store.attempts(1)] == ["interrupted", "finished"]

    assert orch("queue", *spec, "--again", cwd=workdir).returncode == 0
    assert orch("worker", "--quiet", cwd=workdir).returncode == 0
    assert store.run(2)["status"] == "finished"
    killed, clean = store.metrics(1), store.metrics(2)
    assert [(m["name"], m["step"]) for m in killed] == [(m["name"], m["step"]) for m in clean]  # no duplicates
    assert _comparable(store.final_metrics(1)) == _comparable(store.final_metrics(2))  # bitwise on CPU
    assert "zs/top1" in store.final_metrics(1) or "knn/top1" in store.final_metrics(1)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_workers_never_run_the_same_run(workdir: Path, backend: str, request: pytest.FixtureRequest) -> None:
    url = f"sqlite:///{workdir}/experiments.db" if backend == "sqlite" else request.getfixturevalue("pg_url")
    env = {**os.environ, "ORCH_STORE": url}
    (workdir / "mlflow.db").unlink()  # the two workers create the default MLflow store at once
    queued = orch("queue", *SMALL, "--steps", "2", "--eval", "zs:split=test", *[f"--seed={s}" for s in range(4)],
                  cwd=workdir, env=env)
    assert queued.stdout.count("queued run") == 4
    workers = [subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker", "--quiet"], cwd=workdir, env=env,
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers)
    store = Store.open(url)
    runs = store.runs()
    assert sorted(r["status"] for r in runs) == ["finished"] * 4
    assert all([a["number"] for a in store.attempts(r["id"])] == [1] for r in runs)
    executed = [int(line.split()[1]) for out in outputs for line in out.splitlines() if line.endswith("finished")
                or " finished:" in line]
    assert sorted(executed) == [r["id"] for r in reversed(runs)]


DRIFT = """from orchestrator import hookimpl
from plugins.losses.infonce import InfoNCE


class Drift(InfoNCE):
    def __init__(self{option}) -> None:
        super().__init__()


@hookimpl
def register_losses(register):
    register("drift", "orch_drift_plugin:Drift", needs={{"image", "text"}})
"""


def test_a_worker_leaves_a_run_it_cannot_run_to_one_that_can(workdir: Path, faulty_site: dict[str, str]) -> None:
    """Workers sharing a store need not be alike: a run that needs a plugin one lacks, an option its version of a
    plugin lacks (or GPUs) waits for another, and no failure is counted. The first worker to claim it used to fail
    it."""
    import torch

    older = install_module_plugin(workdir / "older", "orch-drift-plugin", "0.1", DRIFT.format(option=""))
    newer = install_module_plugin(workdir / "newer", "orch-drift-plugin", "0.2",
                                  DRIFT.format(option=", margin: float = 0.0"))
    full = {"PYTHONPATH": f"{newer['PYTHONPATH']}:{faulty_site['PYTHONPATH']}"}  # faulty and the newer drift
    queue = [[*SMALL, "--loss", "faulty"], [*SMALL, "--seed", "1"], [*SMALL, "--loss", "drift:margin=0.5"]]
    if not torch.cuda.is_available():  # a run for a GPU worker, queued where there is none
        queue.append([*SMALL, "--gpus", "all"])
    for args in queue:
        assert orch("queue", *args, "--steps", "2", "--eval", "zs", cwd=workdir, env=full).returncode == 0
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    plain = orch("worker", "--quiet", cwd=workdir, env=older)  # no faulty plugin here, and the older drift
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert [store.run(i)["status"] for i in (1, 2, 3)] == ["queued", "finished", "queued"]
    error = store.run(1)["error"]
    assert error.startswith("worker ") and "has no loss 'faulty' (queued from orch-faulty-plugin 0.0.1)" in error
    assert [a["outcome"] for a in store.attempts(1)] == ["interrupted"] and store.run(1)["failures"] == 0
    assert ("has loss 'drift' from orch-drift-plugin 0.1, without option margin (queued from orch-drift-plugin "
            "0.2)") in store.run(3)["error"]
    left = [1, 3, 4] if len(queue) == 4 else [1, 3]
    assert f"left {len(left)} run(s) it cannot run ({', '.join(map(str, left))})" in plain.stdout, plain.stdout

    able = orch("worker", "--quiet", cwd=workdir, env=full)
    assert able.returncode == 0, able.stdout + able.stderr
    assert [store.run(i)["status"] for i in (1, 3)] == ["finished", "finished"]
    assert [a["outcome"] for a in store.attempts(3)] == ["interrupted", "finished"]
    if len(queue) == 4:
        assert store.run(4)["status"] == "queued" and "--gpus all" in store.run(4)["error"]
        assert [a["outcome"] for a in store.attempts(4)] == ["interrupted", "interrupted"]


def test_two_process_gloo_run_end_to_end(workdir: Path) -> None:
    result = orch("run", *SMALL, "--gpus", "2", "--steps", "6", "--checkpoint-every", "3", "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    assert store.run(1)["status"] == "finished"
    assert store.latest_checkpoint(1)["step"] == 6
    checkpoint = Path(store.latest_checkpoint(1)["path"])
    assert (checkpoint / "rank0.pt").exists() and (checkpoint / "rank1.pt").exists()  # both ranks saved
    assert "zs/top1" in store.final_metrics(1)


def test_queue_and_cancel_while_a_worker_runs(workdir: Path) -> None:
    """A cancel stops every process of the run before the worker moves on: 2 ranks (torchrun starts each in a
    session of its own) and their loader workers, which die with their rank."""
    spec = [*SMALL, "--steps", "400", "--log-every", "5", "--gpus", "2", "--workers", "1"]
    assert orch("queue", *spec, cwd=workdir).returncode == 0
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    worker = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker", "--lease", "4", "--quiet"],
                              cwd=workdir, stdout=subprocess.PIPE, text=True)
    wait_until(lambda: store.progress(1).get("step", 0) >= 5, 300, "run 1 to train")
    assert orch("queue", *SMALL, "--steps", "2", cwd=workdir).returncode == 0  # queued while the worker is busy
    cancelled = orch("cancel", "1", cwd=workdir)
    assert "its worker stops it" in cancelled.stdout
    lines = iter(worker.stdout.readline, "")
    assert any(line.startswith("run 1 cancelled") for line in lines)
    # at once: a loader worker that outlived its rank would linger up to torch's 5 s watchdog (tests/test_data.py
    # checks that deterministically)
    wait_until(lambda: not training_processes(workdir / "runs" / "1"), 2, "run 1's processes to exit")
    out, _ = worker.communicate(timeout=300)
    assert worker.returncode == 0
    assert "run 2 finished" in out
    assert store.run(1)["status"] == "cancelled" and store.run(2)["status"] == "finished"
    assert [a["outcome"] for a in store.attempts(1)] == ["cancelled"]
    assert store.progress(1)["step"] < 400


def _signal_every_process(root: psutil.Process, signum: int) -> list[str]:
    """What systemd's default KillMode and a plain `scancel` do: the signal to every process at once (here the
    worker, its launcher, the ranks and their loader workers). Returns the command lines of those under ``root``."""
    processes = [root, *root.children(recursive=True)]
    commands = [" ".join(p.cmdline()) for p in processes[1:]]  # before any of them can exit
    for proc in processes:
        proc.send_signal(signum)
    return commands


def _resumes_like_an_uninterrupted_run(workdir: Path, store: Store, spec: list[str]) -> None:
    """Run 1 was stopped and resumed; a second, uninterrupted run of the same spec logs the same (name, step) pairs
    and ends with the same metrics, bit for bit on the CPU."""
    assert orch("queue", *spec, "--again", cwd=workdir).returncode == 0
    assert orch("worker", "--quiet", cwd=workdir).returncode == 0
    stopped, clean = store.metrics(1), store.metrics(2)
    assert [(m["name"], m["step"]) for m in stopped] == [(m["name"], m["step"]) for m in clean]
    assert _comparable(store.final_metrics(1)) == _comparable(store.final_metrics(2))


@pytest.mark.parametrize("command, signum, target, grace, processes",
                         [("worker", signal.SIGTERM, "worker", 60, 1), ("run", signal.SIGINT, "group", 60, 2),
                          ("worker", signal.SIGTERM, "every-process", 60, 2),
                          ("worker", signal.SIGTERM, "worker", 0, 1)],
                         ids=["sigterm-worker", "ctrl-c-2-processes", "sigterm-every-process", "no-checkpoint"])
def test_a_stopped_worker_checkpoints_and_hands_its_run_back_to_the_queue(workdir: Path, command: str, signum: int,
                                                                         target: str, grace: int,
                                                                         processes: int) -> None:
    """SIGTERM (a scheduler's preemption, `docker stop`) to `orch worker`; Ctrl-C in the terminal of `orch run`
    (SIGINT to its whole foreground group) of a 2-process run; SIGTERM to every process of a 2-process run with a
    loader worker each (systemd's default, a plain `scancel`): the ranks agree on a step, save a checkpoint there
    and exit, the run is queued again at once, the stop does not count against --max-attempts,
    and the next worker resumes it to the end an uninterrupted run reaches. With --checkpoint-on-stop 0 the ranks
    stop at once: the run resumes from its last periodic checkpoint (none here)."""
    spec = [*SMALL, "--steps", "200", "--checkpoint-every", "0", "--log-every", "2", "--gpus", str(processes)]
    if target == "every-process":
        spec += ["--workers", "1"]
    stop = ["--checkpoint-on-stop", str(grace), "--quiet"]
    if command == "worker":
        assert orch("queue", *spec, cwd=workdir).returncode == 0
        argv = ["worker", *stop]
    else:
        argv = ["run", *spec, *stop]
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *argv], cwd=workdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_until(lambda: store.progress(1).get("step", 0) >= 4, 300, "run 1 to train")
    if target == "group":
        os.killpg(proc.pid, signum)
    elif target == "every-process":
        names = _signal_every_process(psutil.Process(proc.pid), signum)
        # two ranks and a loader worker each (forked: the same command line), besides torchrun
        assert sum("orchestrator.engine.train" in n and "torch.distributed.run" not in n for n in names) >= 4, names
    else:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, out + err
    assert not training_processes(workdir / "runs" / "1")
    run = store.run(1)
    assert (run["status"], run["failures"], run["lease_owner"]) == ("queued", 0, None), run
    reason = f"the worker was stopped ({signal.Signals(signum).name})"
    assert [(a["outcome"], a["error"]) for a in store.attempts(1)] == [("interrupted", reason)]
    assert "Traceback" not in err
    if not grace:
        assert store.latest_checkpoint(1) is None and "saving a checkpoint" not in out
        assert f"run 1 interrupted: {reason}; back in the queue, resumed from the start by the next worker" in out
        assert store.claim("next-worker", 60) == Claim(1, 2)  # at once, not after the 60 s lease
        return

    step = store.latest_checkpoint(1)["step"]
    assert 4 <= step < 200, step
    assert "run 1: saving a checkpoint before stopping" in out
    assert f"run 1 interrupted: {reason}; back in the queue, resumed from step {step} by the next worker" in out
    log = (workdir / "runs" / "1" / "attempt-1.log").read_text()
    assert f"orch: stopping as asked: checkpoint saved at step {step}" in log
    assert "DataLoader worker" not in log  # none died under its rank (torch: "DataLoader worker (pid N) is killed")
    resumed = orch("worker", "--quiet", cwd=workdir)  # at once: the run is queued, not waiting for a lease
    assert resumed.returncode == 0 and f"resuming from step {step}" in resumed.stdout, resumed.stdout
    assert [a["outcome"] for a in store.attempts(1)] == ["interrupted", "finished"]
    _resumes_like_an_uninterrupted_run(workdir, store, spec)


@pytest.mark.parametrize("processes, cadence, signalled",
                         [(1, ["--steps", "120", "--log-every", "2"], "0"),
                          (2, ["--steps", "600", "--log-every", "600", "--eval-every", "200"], "1")],
                         ids=["lone-rank", "rank-1-of-2-logging-only-at-the-end"])
def test_sigterm_to_a_rank_alone_checkpoints_within_steps_and_the_worker_resumes_the_run(
        workdir: Path, processes: int, cadence: list[str], signalled: str) -> None:
    """SIGTERM that reaches only a training process (an operator's `kill`, a node agent): the ranks agree through
    their per-step stop vote, save one checkpoint at the same step, a few steps after the signal, and exit as
    when their worker asks; the worker, not stopped itself, counts no failure and resumes the run from that
    checkpoint at once, to the end an uninterrupted run reaches. The second case signals rank 1 of a run that
    logs only at its last step: the ranks agreed only at log steps before, so that run went on to its end (a
    preemption's grace is seconds; a log interval can be minutes)."""
    spec = [*SMALL, *cadence, "--checkpoint-every", "0", "--gpus", str(processes)]
    steps = int(cadence[1])
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", *spec, "--quiet"], cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: store.metrics(1), 300, "run 1's first logged metrics")  # the first sign of training
    first = store.metrics(1)[0]["step"]
    (rank,) = [p for p in training_processes(workdir / "runs" / "1") if p.environ().get("RANK", "0") == signalled]
    rank.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    attempts = store.attempts(1)
    assert [a["outcome"] for a in attempts] == ["interrupted", "finished"], attempts
    step = int(attempts[0]["error"].rsplit(" ", 1)[1])
    assert attempts[0]["error"] == f"its training processes got SIGTERM and saved step {step}"
    assert first < step < steps, (first, step)
    log = (workdir / "runs" / "1" / "attempt-1.log").read_text()
    assert f"orch: stopping as asked: checkpoint saved at step {step}" in log and f"step {steps}/{steps}" not in log
    assert f"resuming from step {step}" in out and store.run(1)["failures"] == 0
    _resumes_like_an_uninterrupted_run(workdir, store, spec)


@pytest.mark.parametrize("eval_every, evaluated", [(20, 20), (0, 40)], ids=["periodic", "final"])
def test_a_stop_during_an_evaluation_saves_its_step_and_the_next_attempt_evaluates_it_first(
        workdir: Path, eval_every: int, evaluated: int) -> None:
    """SIGTERM to the worker while its run evaluates (imagenet-zs's 80,000 prompts: seconds here, minutes on a real
    validation set, past a preemption's grace): rank 0 stops the evaluators between batches, the ranks save that
    step (the last one's checkpoint is there already) and exit, the next attempt evaluates the step before it
    trains on, and the run ends with the same metrics at the same steps as an uninterrupted one. The evaluation
    used to run to its end before the ranks even voted."""
    root = imagenet_folder(workdir / "imagenet" / "val")
    spec = [*SMALL, "--eval", f"imagenet-zs:root={root},workers=0", "--steps", "40", "--eval-every", str(eval_every),
            "--log-every", "10", "--checkpoint-every", "0", "--gpus", "2"]
    assert orch("queue", *spec, cwd=workdir).returncode == 0
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    worker = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker", "--checkpoint-on-stop", "120",
                               "--quiet"], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = workdir / "runs" / "1" / "attempt-1.log"
    evaluating = f"orch: evaluating step {evaluated}: imagenet-zs"
    wait_until(lambda: log.exists() and evaluating in log.read_text(), 300, f"run 1 to evaluate step {evaluated}")
    worker.send_signal(signal.SIGTERM)
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 143, out + err
    assert store.latest_checkpoint(1)["step"] == evaluated
    assert f"orch: the evaluation of step {evaluated} was interrupted by a stop request" in log.read_text()
    assert not [m for m in store.metrics(1) if m["name"].startswith("imagenet-zs/")]
    resumed = orch("worker", "--quiet", cwd=workdir)
    assert resumed.returncode == 0 and f"resuming from step {evaluated}" in resumed.stdout, resumed.stdout
    second = (workdir / "runs" / "1" / "attempt-2.log").read_text()
    assert evaluating in second and (evaluated == 40 or second.index(evaluating) < second.index("step 30/40"))
    _resumes_like_an_uninterrupted_run(workdir, store, spec)


def test_a_cancel_that_rank_0_sees_first_ends_as_cancelled_everywhere(workdir: Path) -> None:
    """The worker heartbeats every lease/4 (15 s at the default lease, 150 s here), so rank 0's next metrics
    write (every 2 steps) usually meets a cancel first, and the ranks exit by themselves (EXIT_FENCED). The run
    must still end as cancelled in the worker's words, the store and MLflow; it was reported as failed before."""
    assert orch("queue", *SMALL, "--steps", "2000", "--log-every", "2", cwd=workdir).returncode == 0
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    worker = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker", "--lease", "600", "--quiet"],
                              cwd=workdir, stdout=subprocess.PIPE, text=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/mlflow.db")

    def tracked() -> list[Run]:
        experiment = client.get_experiment_by_name("orch")
        return client.search_runs([experiment.experiment_id]) if experiment else []

    wait_until(lambda: store.progress(1).get("step", 0) >= 4 and tracked(), 300, "run 1 to train and be tracked")
    assert "its worker stops it" in orch("cancel", "1", cwd=workdir).stdout
    out, _ = worker.communicate(timeout=300)
    assert worker.returncode == 0
    assert "orch: stopping: run 1 attempt 1 no longer holds the run" in (workdir / "runs/1/attempt-1.log").read_text()
    assert "run 1 cancelled" in out and "failed" not in out, out
    run = store.run(1)
    assert (run["status"], run["error"]) == ("cancelled", "cancelled by the user")
    assert [(a["outcome"], a["error"]) for a in store.attempts(1)] == [("cancelled", None)]
    (mlflow_run,) = tracked()
    assert mlflow_run.info.status == "KILLED" and "orch.error" not in mlflow_run.data.tags
    assert not training_processes(workdir / "runs" / "1")
