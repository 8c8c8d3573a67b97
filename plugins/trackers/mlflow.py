"""MLflow tracker: params, tags, per-step metrics and final artifacts of every run (MLFLOW_TRACKING_URI).

One MLflow run per orch run, found again across attempts and processes by its ``orch.run_uid`` tag, so
a resumed attempt (or another process ending the run) needs no state of its own. Default store:
``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlruns``; experiment ``$ORCH_EXPERIMENT`` or
``orch``. All MLflow I/O happens on one background thread: the hooks only enqueue, except
``run_ended``, which waits (at most ``$ORCH_MLFLOW_END_TIMEOUT`` seconds, default 300) for it. A tracker
that fails never fails the run: it logs one warning and keeps unsent metrics to retry.

This module is an entry point: it must not import mlflow (about 2 s) or torch at import time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import functools
import json
import logging
import os
import queue
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import hookimpl
from orchestrator.options import is_secret, masked

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from orchestrator.runinfo import RunInfo

log = logging.getLogger(__name__)

UID_TAG = "orch.run_uid"
MAX_BUFFERED = 100_000  # metric points kept while MLflow is unreachable; the oldest go first
BATCH = 1000  # MLflow's limit of metrics per log_batch
TAGS_PER_BATCH = 100  # and of params or tags
MAX_PARAM = 6000  # longer params are truncated by MLflow with a warning: truncate quietly ourselves
MAX_ERROR = 5000
STATUSES = {"finished": "FINISHED", "failed": "FAILED", "cancelled": "KILLED", "interrupted": "KILLED"}
def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def flatten_params(spec: dict[str, Any]) -> dict[str, str]:
    """Scalar options of the resolved spec as MLflow params: ``encoder.depth``, ``eval.0.name``.

    A component ``{"name", "options", "plugin"}`` flattens to ``slot.name`` and ``slot.<option>``
    (plugin versions are tags); a list of scalars is one param, its JSON; secrets are left out.
    """
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            if "name" in value and isinstance(value.get("options"), dict):  # a component
                value = {"name": value["name"], **value["options"]}
            for key, sub in value.items():
                if not is_secret(str(key)):
                    walk(f"{prefix}.{key}" if prefix else str(key), sub)
        elif isinstance(value, list) and not all(_scalar(v) for v in value):
            for i, sub in enumerate(value):
                walk(f"{prefix}.{i}", sub)
        else:
            text = json.dumps(value) if isinstance(value, list) else str(value)
            out.setdefault(_key(prefix), text[:MAX_PARAM])

    walk("", spec)
    return out


def spec_tags(run: RunInfo) -> dict[str, str]:
    """Tags that identify the run, its components, plugin versions, code and machine."""
    spec = run.spec
    tags = {UID_TAG: run.uid, "orch.run_id": str(run.id), "orch.spec_hash": run.spec_hash,
            "orch.attempt": str(run.attempt), "orch.host": socket.gethostname()}
    if run.device:
        tags["orch.device"] = run.device
    slots = {slot: spec.get(slot) for slot in ("data", "encoder", "text_encoder", "loss", "sampler")}
    evals = [c for c in spec.get("eval") or [] if isinstance(c, dict)]
    components = [c for c in slots.values() if isinstance(c, dict)] + evals
    tags.update({f"orch.{slot}": str(c.get("name")) for slot, c in slots.items() if isinstance(c, dict)})
    if evals:
        tags["orch.eval"] = ",".join(str(c.get("name")) for c in evals)
    for comp in components:
        plugin = comp.get("plugin") or {}
        if plugin.get("distribution"):
            tags[_key(f"orch.plugin.{plugin['distribution']}")] = str(plugin.get("version"))
    commit = _git_commit()
    if commit:
        tags["orch.git_commit"] = tags["mlflow.source.git.commit"] = commit
    return tags


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _key(name: str) -> str:
    """A metric/param/tag name MLflow accepts: one bad name would poison a whole batch forever."""
    name = re.sub(r"[^/\w.\- ]", "_", name)
    if not name or name.startswith(("/", ".")) or "//" in name or "/./" in name or "/../" in name:
        name = re.sub(r"[^\w.\-]", "_", name).lstrip(".") or "_"
    return name


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def _warn(what: str, exc: BaseException | str) -> None:
    error = exc if isinstance(exc, str) else _one_line(exc)
    log.warning("orch mlflow tracker: %s: %s; training continues", what, error)


def _guarded(what: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A hook never raises: whatever fails becomes one warning line."""

    def decorate(method: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(method)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            try:
                method(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - a tracker must never fail a run
                _warn(what, exc)

        return wrapper

    return decorate


@dataclass
class _Attached:
    run_id: str
    last_step: dict[str, int] = field(default_factory=dict)  # per key: steps <= this were logged before


class MlflowTracker:
    """Per-process tracker state: the client, uid -> MLflow run, the outbox and its sending thread.

    Hooks put operations on a queue and return; one thread applies them in order, buffering metric
    points and sending them with ``log_batch``. What MLflow refuses (points, tags, the end of a run)
    stays pending, bounded, and is retried with backoff and at every flush, so the tracker catches up.
    """

    def __init__(self) -> None:
        self.end_timeout = float(os.environ.get("ORCH_MLFLOW_END_TIMEOUT", "300"))
        self._queue: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._client_obj: MlflowClient | None = None
        self._default_store = False
        self._experiment_id: str | None = None
        self._infos: dict[str, RunInfo] = {}  # uid -> latest RunInfo seen
        self._runs: dict[str, _Attached] = {}  # uid -> attached MLflow run
        self._started: set[str] = set()  # uids this process trains: it may create their MLflow run
        # Pending, per uid: metric points (key, value, timestamp ms, step), tags, the end (status, error).
        self._points: dict[str, list[tuple[str, float, int, int]]] = {}
        self._tags: dict[str, dict[str, str]] = {}
        self._ends: dict[str, tuple[str, str | None]] = {}
        self._failing = False  # a failure was reported and nothing succeeded since: warn once
        self._dropping = False
        self._backoff = 1.0
        self._next_try = 0.0

    # --- hooks: cheap, never raise -----------------------------------------------------------------

    @_guarded("starting the run failed")
    def run_started(self, run: RunInfo, resumed_from: int | None) -> None:
        self._put(("start", run))

    @_guarded("queuing metrics failed")
    def metrics_logged(self, run: RunInfo, step: int, metrics: dict[str, float]) -> None:
        self._put(("metrics", run, step, dict(metrics), int(time.time() * 1000)))

    @_guarded("recording the checkpoint failed")
    def checkpoint_saved(self, run: RunInfo, step: int, path: Path) -> None:
        self._put(("tag", run, "orch.last_checkpoint_step", str(step)))

    @_guarded("recording the end of the run failed")
    def run_ended(self, run: RunInfo, status: str, error: str | None) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        self._wait(("end", run, status, error), self.end_timeout)

    def flush(self, timeout: float = 60.0) -> None:
        """Send everything queued so far; raises what failed (the hooks turn that into a warning)."""
        self._wait(("flush", None), timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (for tests: a training process simply exits)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(("stop", None))
            self._thread.join(timeout)

    @property
    def buffered(self) -> int:
        return sum(map(len, self._points.values()))

    # --- the queue and its thread ------------------------------------------------------------------

    def _put(self, op: tuple[Any, ...]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="orch-mlflow", daemon=True)
                self._thread.start()
        self._queue.put(op)

    def _wait(self, op: tuple[Any, ...], timeout: float) -> None:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._put((*op, done))
        try:
            done.result(timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"MLflow did not answer within {timeout:g}s") from None

    def _loop(self) -> None:
        while True:
            pending = self._points or self._tags or self._ends
            wait = max(0.05, self._next_try - time.monotonic()) if pending else None
            try:
                op = self._queue.get(timeout=wait)
            except queue.Empty:
                self._send_quietly()
                continue
            if op[0] == "stop":
                return
            try:
                self._handle(op)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive anything odd
                self._report("tracking failed", exc)

    def _handle(self, op: tuple[Any, ...]) -> None:
        kind, run = op[0], op[1]
        if run is not None:
            self._infos[run.uid] = run
        if kind == "start":
            self._start(run)
        elif kind == "metrics":
            self._buffer(run, op[2], op[3], op[4])
        elif kind == "tag":
            self._tags.setdefault(run.uid, {})[op[2]] = op[3]
        elif kind in ("flush", "end"):
            if kind == "end":
                self._ends[run.uid] = (op[2], op[3])
            try:
                self._send()
                op[-1].set_result(None)
            except Exception as exc:  # noqa: BLE001 - the waiting hook reports it
                self._failing = True
                self._retry_later()
                op[-1].set_exception(exc)
            return
        if self._queue.empty() and time.monotonic() >= self._next_try:
            self._send_quietly()  # one batch for whatever piled up while the last send ran

    def _start(self, run: RunInfo) -> None:
        self._started.add(run.uid)
        self._runs.pop(run.uid, None)  # a new attempt attaches afresh: tags, status, skip map
        self._ends.pop(run.uid, None)  # and supersedes an end of the previous attempt not yet recorded
        try:
            self._attached(run)
        except Exception as exc:  # noqa: BLE001 - retried with the first metrics sent
            self._report("starting the run failed", exc)

    def _send_quietly(self) -> None:
        try:
            self._send()
        except Exception as exc:  # noqa: BLE001
            self._report(f"sending failed ({self.buffered} metric points buffered, will retry)", exc)

    def _report(self, what: str, exc: BaseException) -> None:
        if not self._failing:
            _warn(what, exc)
        self._failing = True
        self._retry_later()

    def _retry_later(self) -> None:
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, 60.0)

    def _buffer(self, run: RunInfo, step: int, metrics: dict[str, Any], ts: int) -> None:
        points = self._points.setdefault(run.uid, [])
        for key, value in metrics.items():
            try:
                points.append((_key(str(key)), float(value), ts, int(step)))
            except (TypeError, ValueError):
                continue  # not a number: nothing MLflow could store
        excess = self.buffered - MAX_BUFFERED
        if excess > 0:
            del points[:excess]
            if not self._dropping:
                _warn("buffer full", f"dropping the oldest of {MAX_BUFFERED} unsent metric points")
            self._dropping = True

    # --- MLflow I/O (on the thread only) -------------------------------------------------------------

    def _client(self) -> MlflowClient:
        if self._client_obj is None:
            uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
            self._client_obj = open_client(uri)
            self._default_store = not os.environ.get("MLFLOW_TRACKING_URI")
        return self._client_obj

    def _experiment(self, create: bool) -> str | None:
        if self._experiment_id is not None:
            return self._experiment_id
        client, name = self._client(), os.environ.get("ORCH_EXPERIMENT") or "orch"
        exp = client.get_experiment_by_name(name)
        if exp is None and not create:
            return None
        if exp is None:
            location = (Path.cwd() / "mlruns").as_uri() if self._default_store else None
            try:
                self._experiment_id = client.create_experiment(name, artifact_location=location)
                return self._experiment_id
            except Exception:  # another process may have created it first
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise RuntimeError(f"MLflow experiment {name!r} is deleted: restore it or set ORCH_EXPERIMENT")
        self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _find(self, run: RunInfo) -> Any:
        """The MLflow run (``mlflow.entities.Run``) tagged with this orch run's uid, or None."""
        experiment = self._experiment(create=False)
        if experiment is None:
            return None
        found = self._client().search_runs([experiment], filter_string=f"tags.`{UID_TAG}` = '{run.uid}'",
                                           max_results=1, order_by=["attributes.start_time ASC"])
        return found[0] if found else None

    def _attached(self, run: RunInfo) -> _Attached:
        """Find or create the MLflow run and bring it up to date; idempotent, so a failure just retries."""
        if run.uid in self._runs:
            return self._runs[run.uid]
        from mlflow.entities import Param, RunTag

        client = self._client()
        existing = self._find(run)
        if existing is None:
            experiment = self._experiment(create=True)
            created = client.create_run(experiment, run_name=run.name, tags={UID_TAG: run.uid})
            run_id, params, last_step = created.info.run_id, {}, {}
        else:
            run_id, params = existing.info.run_id, existing.data.params
            if existing.info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            # Steps an earlier attempt logged are not logged again: MLflow would keep both points.
            last_step = {key: max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
                         for key in existing.data.metrics}
        # Params are write-once: log only the missing ones, never a changed value.
        new = [Param(k, v) for k, v in flatten_params(run.spec).items() if k not in params]
        tags = [RunTag(k, v) for k, v in spec_tags(run).items()]
        for i in range(0, max(len(new), len(tags)), TAGS_PER_BATCH):
            client.log_batch(run_id, params=new[i:i + TAGS_PER_BATCH], tags=tags[i:i + TAGS_PER_BATCH],
                             synchronous=True)
        client.log_dict(run_id, masked(_spec_json(run)), "spec.json")
        self._runs[run.uid] = _Attached(run_id, last_step)
        return self._runs[run.uid]

    def _send(self) -> None:
        """Send what is pending: tags, metric points (minus steps logged before), ends of runs."""
        from mlflow.entities import Metric, RunTag

        for uid in list({*self._points, *self._tags, *self._ends}):
            run = self._infos[uid]
            if self._tags.get(uid) or self._points.get(uid):
                attached, client = self._attached(run), self._client()
                if self._tags.get(uid):
                    tags = [RunTag(k, v) for k, v in self._tags[uid].items()]
                    client.log_batch(attached.run_id, tags=tags, synchronous=True)
                    del self._tags[uid]
                points = self._points.get(uid, [])
                points[:] = [p for p in points if p[3] > attached.last_step.get(p[0], -1)]
                while points:
                    batch = [Metric(k, v, ts, step) for k, v, ts, step in points[:BATCH]]
                    client.log_batch(attached.run_id, metrics=batch, synchronous=True)
                    del points[:BATCH]
            self._points.pop(uid, None)
            self._tags.pop(uid, None)
            if uid in self._ends:
                self._end(run, *self._ends[uid])
                del self._ends[uid]
        self._failing, self._dropping, self._backoff, self._next_try = False, False, 1.0, 0.0

    def _end(self, run: RunInfo, status: str, error: str | None) -> None:
        if run.uid in self._started:
            run_id = self._attached(run).run_id
        else:  # a process ending a run it never trained (lease expired): find it, never create one
            found = self._find(run)
            if found is None:
                return
            run_id = found.info.run_id
        client = self._client()
        if status == "finished":
            for path in (run.weights_path, run.eval_report_path):
                if path.is_file():
                    client.log_artifact(run_id, str(path), artifact_path="final")
        if status == "failed" and error:
            client.set_tag(run_id, "orch.error", error[:MAX_ERROR])
        client.set_terminated(run_id, STATUSES[status])


def open_client(uri: str) -> MlflowClient:
    """The client of ``uri``; a new local SQLite store is created whole or not at all. MLflow migrates a new store
    for seconds, not in one transaction: a process killed meanwhile (Ctrl-C in the first seconds of the first run)
    left a store that nothing could open again ("table ... already exists"). So the store is migrated under a
    temporary name and renamed into place, under a lock (two workers creating one store race on its tables)."""
    from mlflow import MlflowClient

    with _creation_lock(uri):
        if uri.startswith("sqlite:///"):
            path, query = uri.removeprefix("sqlite:///").partition("?")[::2]
            target = Path(path)
            if not target.exists():
                for stale in target.parent.glob(f"{target.name}.creating-*"):  # from a process killed creating it
                    stale.unlink()
                partial = target.with_name(f"{target.name}.creating-{os.getpid()}")
                MlflowClient(tracking_uri=f"sqlite:///{partial}" + (f"?{query}" if query else ""))  # migrates it
                os.replace(partial, target)
        return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def _creation_lock(uri: str) -> Iterator[None]:
    """Serialise the creation and migration of a local SQLite tracking store across processes."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _spec_json(run: RunInfo) -> dict[str, Any]:
    """The spec as written to the run directory, else as resolved in memory."""
    try:
        return json.loads(run.spec_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return run.spec


_TRACKER: MlflowTracker | None = None
_PID = 0


def tracker() -> MlflowTracker:
    """The process's tracker (a fresh one after a fork: threads do not survive it)."""
    global _TRACKER, _PID
    if _TRACKER is None or _PID != os.getpid():
        _TRACKER, _PID = MlflowTracker(), os.getpid()
    return _TRACKER


@hookimpl
def run_started(run: RunInfo, resumed_from: int | None) -> None:
    tracker().run_started(run, resumed_from)


@hookimpl
def metrics_logged(run: RunInfo, step: int, metrics: dict[str, float]) -> None:
    tracker().metrics_logged(run, step, metrics)


@hookimpl
def checkpoint_saved(run: RunInfo, step: int, path: Path) -> None:
    tracker().checkpoint_saved(run, step, path)


@hookimpl
def run_ended(run: RunInfo, status: str, error: str | None) -> None:
    tracker().run_ended(run, status, error)
