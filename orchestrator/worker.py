"""The claim loop: requeue runs of dead workers, claim the next run, launch its ranks, keep its lease.

The worker owns a run's state transitions; its training processes (one per GPU, or gloo processes on a CPU
machine; several launched with torchrun) only write metrics and checkpoints, fenced by the attempt.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from orchestrator.engine.checkpoint import verify
from orchestrator.errors import UserError
from orchestrator.launch import (
    CHECKPOINT_ON_SIGTERM,
    STALL_TIMEOUT,
    Gpus,
    command,
    die_with_parent,
    environment,
    is_this_machine,
    plan,
    read_hostfile,
    worker_devices,
)
from orchestrator.registry import Registry
from orchestrator.runinfo import RunInfo
from orchestrator.spec import spec_components
from orchestrator.store import STORE_ENV, Claim, Fenced, Store

RUNS_DIR_ENV = "ORCH_RUNS_DIR"


def runs_dir(path: str | Path | None = None) -> Path:
    """Where checkpoints, logs and final weights go: shared storage when workers are on several machines."""
    root = Path(path or os.environ.get(RUNS_DIR_ENV) or "runs").absolute()
    if root.exists() and not root.is_dir():
        raise UserError(f"runs folder {root} is a file: pass --runs-dir (or {RUNS_DIR_ENV}) naming a folder")
    return root


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    def __init__(self, store: Store, root: Path, lease_seconds: float = 60.0, quiet: bool = False,
                 echo: Callable[[str], None] = print, gpus: Gpus | None = None, hostfile: Path | None = None,
                 master_addr: str | None = None, checkpoint_on_stop: float = 20.0, stall_timeout: float = 0.0) -> None:
        self.store, self.root, self.lease, self.quiet, self.echo = store, root, lease_seconds, quiet, echo
        self.checkpoint_on_stop = checkpoint_on_stop  # seconds the ranks get to save before a stop stops them
        self.stall_timeout = stall_timeout  # seconds without a sign of life before an attempt is stopped; 0: never
        self.devices = worker_devices(gpus)  # checked before claiming anything: a wrong --gpus is one line
        self.hostfile = hostfile.absolute() if hostfile else None
        self.hosts = read_hostfile(self.hostfile) if self.hostfile else None
        self.master_addr = master_addr
        if self.hosts and not is_this_machine(self.hosts[0][0]):
            echo(f"warning: the first host of {self.hostfile} ({self.hosts[0][0]}) does not look like this machine: "
                 f"rank 0 runs there and its rendezvous port is picked here; list this machine first")
        self.registry = Registry.load()
        self.id = worker_id()
        self.stop_signal: int | None = None  # set by stop_on_signals: hand the run back to the queue, then stop
        self.signalled = threading.Event()  # the same, to wake the waits below at once
        self.left: set[int] = set()  # runs this worker cannot run (a plugin, GPUs): left for the others

    def stop_on_signals(self) -> None:
        """SIGTERM (a scheduler's preemption, `docker stop`) and SIGINT (Ctrl-C) stop this worker once the run it
        holds has saved a checkpoint (within ``checkpoint_on_stop`` seconds) and is back in the queue; a second
        signal stops it at once (the run's lease then expires)."""
        def stop(signum: int, _frame: object) -> None:
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = signum
            self.signalled.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, stop)

    def loop(self, once: bool = False, forever: bool = False, poll_seconds: float = 5.0) -> int:
        """Run queued runs until the queue is empty (or forever); returns how many were executed."""
        done = 0
        while self.stop_signal is None:
            self.reap()
            claim = self.store.claim(self.id, self.lease, skip=self.left)
            if claim is None:
                if not forever:
                    return done
                self.signalled.wait(poll_seconds)
                continue
            if (why := self.cannot_run(self.store.run(claim.run_id)["spec"])) is not None:
                why += "; left in the queue for a worker that can run it"
                self.store.end_attempt(claim, "interrupted", why)
                self.left.add(claim.run_id)
                self.echo(f"run {claim.run_id}: {why}")
                continue
            self.execute(claim)
            done += 1
            if once:
                return done
        return done

    def cannot_run(self, spec: dict[str, Any]) -> str | None:
        """Why this worker cannot run ``spec``, or None: a plugin it lacks, a version of it without an option the
        run sets, or GPUs it does not have. Workers that share a store need not be alike; a run one of them cannot
        run waits for another (not failed by the wrong one, as it was when the ranks found out)."""
        for kind, entry in spec_components(spec):
            plugin = entry.get("plugin") or {}  # the package that provided it where the run was queued
            source = " ".join(str(plugin[key]) for key in ("distribution", "version") if plugin.get(key))
            queued_from = f" (queued from {source})" if source else ""
            component = self.registry.components[kind].get(entry["name"])
            if component is None:
                return f"worker {self.id} has no {kind} {entry['name']!r}{queued_from}"
            unknown = [name for name in entry.get("options", {}) if component.option(name) is None]
            if unknown:
                return (f"worker {self.id} has {kind} {entry['name']!r} from {component.distribution} "
                        f"{component.version}, without option {', '.join(unknown)}{queued_from}")
        trainer = spec["trainer"]
        try:
            plan(trainer["gpus"], trainer["batch_size"], trainer["accum"], self.devices, self.hosts)
        except UserError as exc:
            return f"worker {self.id} cannot run it: {exc}"
        return None

    def reap(self) -> None:
        """Runs whose worker died go back to the queue (and resume from their last valid checkpoint)."""
        for lost in self.store.requeue_expired():
            then = {"queued": "requeued", "failed": "failed", "cancelled": "its cancel is complete"}[lost["status"]]
            self.echo(f"run {lost['run_id']}: {lost['error']}; {then}")
            status = {"queued": "interrupted", "failed": "failed", "cancelled": "cancelled"}[lost["status"]]
            self.registry.notify("run_ended", run=self._info(lost["run_id"], lost["attempt"]), status=status,
                                 error=lost["error"])

    def execute(self, claim: Claim) -> str:
        """Launch the ranks of one claimed attempt and follow it to its end; returns the run's status."""
        run = self.store.run(claim.run_id)
        run_dir = self.root / str(run["id"])
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(run_dir / "spec.json", run["spec"])
        _write_json(run_dir / "run.json", {k: run[k] for k in ("id", "uid", "name", "spec_hash")})
        checkpoint = self._usable_checkpoint(claim)
        log_path = run_dir / f"attempt-{claim.attempt}.log"
        resume = f", resuming from step {checkpoint['step']}" if checkpoint else ""
        self.echo(f"run {run['id']} ({run['name']}): attempt {claim.attempt}{resume}; log: {log_path}")

        trainer = run["spec"]["trainer"]
        try:
            launch = plan(trainer["gpus"], trainer["batch_size"], trainer["accum"], self.devices, self.hosts)
        except UserError as exc:  # this worker cannot run it (too few GPUs): say so, leave nothing half-done
            status = self.store.end_attempt(claim, "failed", str(exc))
            self.echo(f"run {run['id']} failed: {exc}")
            return status
        train_args = ["--run-dir", str(run_dir), "--attempt", str(claim.attempt)]
        if checkpoint:
            train_args += ["--resume-tag", Path(checkpoint["path"]).name]
        env = {**os.environ, **environment(launch), "PYTHONUNBUFFERED": "1",
               STORE_ENV: self.store.url}  # not argv: ps shows argv
        if self.stall_timeout > 0:
            env[STALL_TIMEOUT] = str(self.stall_timeout)
        if self.checkpoint_on_stop > 0 and not launch.multi_node:  # across hosts, the runner relays SIGTERM to
            env[CHECKPOINT_ON_SIGTERM] = "1"  # stop the ranks (_stop): there it must stay a hard stop
        # this worker's death takes the launcher down; DeepSpeed's runner needs SIGTERM to relay it to its hosts
        parent_death = signal.SIGTERM if launch.multi_node else signal.SIGKILL
        info = self._info(run["id"], claim.attempt)
        with open(log_path, "ab") as log, _ExportFile(env, launch.multi_node) as exports:
            argv = command(launch, train_args, self.hostfile, _free_port() if launch.multi_node else None,
                           self.master_addr)
            # a session of their own: Ctrl-C in a terminal reaches this worker, which asks them for a checkpoint
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=exports.env,
                                    preexec_fn=partial(die_with_parent, parent_death), cwd=os.getcwd(),
                                    start_new_session=True)
            ending = self._follow(proc, claim, run, info, launch.multi_node)
        return self._finish(proc.returncode, ending, claim, run, info, log_path)

    def _usable_checkpoint(self, claim: Claim) -> dict[str, Any] | None:
        """The latest valid checkpoint whose files are whole; damaged ones are invalidated, with a word."""
        while (checkpoint := self.store.latest_checkpoint(claim.run_id)) is not None:
            problem = verify(Path(checkpoint["path"]))
            if problem is None:
                return checkpoint
            self.store.invalidate_checkpoint(claim, checkpoint["path"])
            self.echo(f"run {claim.run_id}: checkpoint at step {checkpoint['step']} is damaged ({problem}); "
                      f"falling back to the previous one")
        return None

    def _follow(self, proc: subprocess.Popen, claim: Claim, run: dict[str, Any], info: RunInfo,
                multi_node: bool) -> str:
        """Heartbeat while the ranks train; stop them if the run is cancelled or the lease is lost ("lost"), or
        if they give no sign of life for ``stall_timeout`` ("stalled"). Told to stop, ask them to checkpoint
        (within two steps) and exit; stop them if they take too long. "ended" when they exited by themselves."""
        beat = max(1.0, self.lease / 4)
        last_beat = time.monotonic()
        silent_for = _Silence(info.alive_path)
        asked_at = None
        with _ProgressBar(run["spec"]["trainer"]["steps"], enabled=not self.quiet) as bar:
            while proc.poll() is None:
                if self.stop_signal is None:
                    self.signalled.wait(0.5)  # a stop signal wakes it: the ranks hear of it at once
                else:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(0.5)  # saving: notice the ranks' exit at once
                if self.stop_signal is not None:
                    if asked_at is None:
                        asked_at = time.monotonic()
                        if self.checkpoint_on_stop > 0:
                            info.stop_request_path.touch()
                            self.echo(f"run {run['id']}: saving a checkpoint before stopping (up to "
                                      f"{self.checkpoint_on_stop:g} s; signal again to stop at once)")
                    if time.monotonic() - asked_at >= self.checkpoint_on_stop:
                        _stop(proc, multi_node)
                        break
                if self.stall_timeout and silent_for() > _stall_deadline(self.stall_timeout):
                    self.echo(f"run {run['id']}: no sign of progress for {self.stall_timeout:g} s (--stall-timeout); "
                              f"stopping it")
                    _stop(proc, multi_node)
                    return "stalled"
                try:
                    if time.monotonic() - last_beat >= beat:
                        last_beat = time.monotonic()
                        if not self.store.heartbeat(claim, self.lease):
                            _stop(proc, multi_node)
                            return "lost"
                    if bar.enabled:
                        bar.update(self.store.progress(run["id"]))
                except DBAPIError as exc:  # the store is briefly unreachable: the lease covers a few beats
                    self.echo(f"run {run['id']}: store unreachable ({type(exc.orig).__name__}); retrying")
        return "ended"

    def _finish(self, code: int, ending: str, claim: Claim, run: dict[str, Any], info: RunInfo, log_path: Path) -> str:
        result = info.result_path  # written whole or not at all
        outcome = json.loads(result.read_text()) if result.exists() else {}
        failures = info.rank_failures()
        if "error" not in outcome and failures and not outcome.get("finished"):  # one rank failed alone
            outcome = {**json.loads(failures[0].read_text()), "from_rank": True}
        try:
            if code == 0 or outcome.get("finished"):
                status = self.store.end_attempt(claim, "finished")
                metrics = {k: v for k, v in self.store.final_metrics(run["id"]).items() if not k.startswith("train/")}
                shown = ", ".join(f"{k} {v:.2f}" for k, v in sorted(metrics.items()))
                self.echo(f"run {run['id']} finished" + (f": {shown}" if shown else ""))
                if code != 0:  # every rank was done and saved; one died while its interpreter shut down
                    self.echo(f"run {run['id']}: a training process exited with code {code} after the run had "
                              f"finished; nothing was lost (see {log_path})")
                return status
            if "error" in outcome:  # rank 0 said why, and that retrying cannot help
                error = outcome["error"]
                status = self.store.end_attempt(claim, "failed", error)
                self.echo(f"run {run['id']} failed: {error}")
                if outcome.get("from_rank"):  # rank 0 did not end the run in the trackers
                    self.registry.notify("run_ended", run=info, status="failed", error=error)
                return status
            # Cancelled by the user: this worker's heartbeat was refused, or rank 0's next store write was
            # (it exits with EXIT_FENCED, usually before the next heartbeat comes).
            if self.store.run(run["id"])["status"] == "cancelled":
                status = self.store.end_attempt(claim, "cancelled")
                self.echo(f"run {run['id']} cancelled")
                self.registry.notify("run_ended", run=info, status="cancelled", error="cancelled by the user")
                return status
            if ending == "lost":  # the heartbeat was refused and nobody cancelled the run: the lease was lost
                raise Fenced(f"run {run['id']} attempt {claim.attempt} lost its lease")
            # told to stop, or the ranks got SIGTERM themselves and saved: back to the queue, no failure counted
            if self.stop_signal is not None or "stopped" in outcome:
                if self.stop_signal is not None:
                    reason = f"the worker was stopped ({signal.Signals(self.stop_signal).name})"
                else:
                    reason = f"its training processes got SIGTERM and saved step {outcome['stopped']}"
                status = self.store.end_attempt(claim, "interrupted", reason)
                checkpoint = self.store.latest_checkpoint(run["id"])
                where = f"from step {checkpoint['step']}" if checkpoint else "from the start"
                self.echo(f"run {run['id']} interrupted: {reason}; back in the queue, resumed {where} by the next "
                          f"worker (`orch cancel {run['id']}` drops it)")
                self.registry.notify("run_ended", run=info, status="interrupted", error=reason)
                return status
            if ending == "stalled":
                error = (f"attempt {claim.attempt} gave no sign of progress for {self.stall_timeout:g} s "
                         f"(--stall-timeout) and was stopped; where each rank hung: the Python stacks after "
                         f"'Timeout' in {log_path}")
            else:
                error = (f"attempt {claim.attempt} exited with code {code}: {_crash_reason(log_path, code)} "
                         f"(see {log_path})")
            status = self.store.end_attempt(claim, "crashed", error)
            self.echo(f"run {run['id']}: {error}; {'will be retried' if status == 'queued' else 'failed'}")
            self.registry.notify("run_ended", run=info, status="interrupted" if status == "queued" else "failed",
                                 error=error)
            return status
        except Fenced:
            self.echo(f"run {run['id']}: this worker lost its lease; another attempt owns the run now")
            return "lost"

    def sync(self, run_id: int) -> int:
        """Replay a run's stored metrics and state to the trackers (after a tracker outage); they skip
        what they already have. Returns the number of steps replayed."""
        run = self.store.run(run_id)
        info = self._info(run_id, run["attempt"])
        self.registry.notify("run_started", run=info, resumed_from=None)
        by_step: dict[int, dict[str, float]] = {}
        for row in self.store.metrics(run_id):
            by_step.setdefault(row["step"], {})[row["name"]] = row["value"]
        for step in sorted(by_step):
            self.registry.notify("metrics_logged", run=info, step=step, metrics=by_step[step])
        if run["status"] in ("finished", "failed", "cancelled"):
            self.registry.notify("run_ended", run=info, status=run["status"], error=run["error"])
        return len(by_step)

    def _info(self, run_id: int, attempt: int) -> RunInfo:
        run = self.store.run(run_id)
        return RunInfo(run["id"], run["uid"], run["name"], run["spec"], run["spec_hash"], attempt,
                       self.root / str(run["id"]))


class _ProgressBar:
    """Step, samples/s, loss and ETA of the run in the foreground, read from what rank 0 logs."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.enabled = enabled and sys.stdout.isatty()
        self.total = total

    def __enter__(self) -> _ProgressBar:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                                TextColumn("{task.fields[stats]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=self.total, stats="starting")
            self.bar.start()
        return self

    def update(self, progress: dict[str, float]) -> None:
        if progress:
            stats = (f"loss {progress.get('train/loss', float('nan')):.4f}  "
                     f"{progress.get('train/samples_per_s', 0):.0f} samples/s")
            self.bar.update(self.task, completed=progress["step"], stats=stats)

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()


class _ExportFile:
    """For DeepSpeed's multi-node runner: the ``ORCH_*`` variables (the store URL among them) in a private
    ``DS_ENV_FILE`` that the runner exports on every host (it forwards only NCCL_*, PYTHON*, MLFLOW_* and a
    few others by itself); removed when the attempt ends. Nothing to do for torchrun on this machine."""

    def __init__(self, env: dict[str, str], needed: bool) -> None:
        self.env, self.needed, self.folder = env, needed, None

    def __enter__(self) -> _ExportFile:
        if self.needed:
            self.folder = Path(tempfile.mkdtemp(prefix="orch-env-"))  # mode 0700: the URL may hold a password
            path = self.folder / "deepspeed_env"
            lines = [f"{k}={v}" for k, v in sorted(self.env.items()) if k.startswith("ORCH_") and "\n" not in v]
            path.write_text("\n".join(lines) + "\n")
            path.chmod(0o600)
            self.env = {**self.env, "DS_ENV_FILE": str(path)}
        return self

    def __exit__(self, *exc: object) -> None:
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    tmp.replace(path)


_ERROR_LINE = re.compile(r"^(?:\[rank(\d+)\]:\s*)?((?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b.*)$")
# torchrun's summary of a failed attempt: the rank that failed first, and its exit code (negative: a signal)
_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)
_OUT_OF_MEMORY_HINT = ("SIGKILL, which orch did not send, is most often the kernel's out-of-memory killer (`dmesg` "
                       "names it): give the run more host memory, or lower --workers, --prefetch or --batch-size")


def _crash_reason(path: Path, code: int) -> str:
    """Why an attempt crashed, in one line. A rank killed by a signal says which (the lone rank's exit code, or
    torchrun's root cause: the other ranks then fail too, with a broken connection that is not the reason); else
    the last exception line of the rank that failed first, or of any rank (torchrun's own says only that a child
    failed)."""
    text = path.read_text(errors="replace")
    root = _ROOT_CAUSE.search(text)
    first, killed_by = (int(root.group(1)), -int(root.group(2))) if root else (None, -code)
    if killed_by > 0:
        who = "the training process" if first is None else f"rank {first}"
        return f"{who} was killed by {_signal_name(killed_by)}" + \
            (f"; {_OUT_OF_MEMORY_HINT}" if killed_by == signal.SIGKILL else "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [(m.group(1), m.group(2)) for line in lines
              if (m := _ERROR_LINE.match(line)) and "ChildFailedError" not in line]
    own = [error for rank, error in errors if rank is not None and int(rank) == first]
    reason = (own or [error for _, error in errors] or lines[-1:] or ["no output"])[-1][:500]
    if "DataLoader worker" in reason and "killed by signal: Killed" in reason:  # torch's words for a SIGKILL
        reason += f" ({_OUT_OF_MEMORY_HINT})"
    return reason


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class _Silence:
    """Seconds since the ranks' last sign of life (``SignOfLife`` touches ``path``), or since the launch before the
    first, timed by this worker's clock when it sees the file change: a shared file system stamps the file with its
    server's clock, which may be minutes off."""

    def __init__(self, path: Path) -> None:
        self.path, self.seen, self.since = path, 0, time.monotonic()

    def __call__(self) -> float:
        with contextlib.suppress(FileNotFoundError):
            if (stamp := self.path.stat().st_mtime_ns) != self.seen:
                self.seen, self.since = stamp, time.monotonic()
        return time.monotonic() - self.since


def _stall_deadline(timeout: float) -> float:
    """When the worker stops a silent attempt: after its ranks' own ``timeout`` (each then writes its stacks to the
    log) and a margin for ranks whose last sign came a step after rank 0's."""
    return timeout + max(5.0, timeout / 10)


def _stop(proc: subprocess.Popen, multi_node: bool) -> None:
    """Stop an attempt now (a cancel, a lost lease, a stop past its checkpoint time): SIGKILL, since SIGTERM may only
    ask the ranks for a checkpoint, to the launcher's group (it leads its own, see execute); ranks and loader
    workers outside it (torchrun gives each rank a session) follow by their parent-death signal. Across hosts,
    SIGTERM first: DeepSpeed's runner relays it through pdsh to every host, where it stops the ranks."""
    if multi_node:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
