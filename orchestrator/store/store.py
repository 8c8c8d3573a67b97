"""The experiment store: the truth about run state, and the queue.

Any SQLAlchemy URL works; the default is ``sqlite:///experiments.db`` in the working directory (WAL).
A claim is one atomic ``UPDATE ... WHERE id = (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``: on
PostgreSQL the row lock skips rows other workers hold, on SQLite the write transaction starts with
``BEGIN IMMEDIATE`` so two claims never interleave. Every write a worker makes for a run is fenced by
the run's attempt number: a worker whose lease expired cannot write to the run any more.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, create_engine, delete, event, func, insert, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, NoSuchModuleError, OperationalError

from orchestrator.errors import UserError
from orchestrator.store.models import Attempt, Checkpoint, Metric, Run, utcnow

DEFAULT_URL = "sqlite:///experiments.db"
STORE_ENV = "ORCH_STORE"
HEAD_REVISION = "0001"
_MIGRATIONS = Path(__file__).parent / "migrations"


class Fenced(Exception):
    """This attempt no longer owns the run (lease expired and re-claimed, or the run was cancelled)."""


@dataclass(frozen=True)
class Claim:
    run_id: int
    attempt: int


def mask_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable store URL>"


class Store:
    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.url = url

    # --- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, url: str | None = None) -> Store:
        """Open (and create or migrate) the store; any problem is one UserError line."""
        url = url or os.environ.get(STORE_ENV) or DEFAULT_URL
        shown = mask_url(url)
        try:
            engine = _engine(url)
            store = cls(engine, url)
            store._migrate()
        except UserError:
            raise
        except (ArgumentError, NoSuchModuleError, ImportError) as exc:
            raise UserError(f"store URL {shown} is not valid ({exc}): give an SQLAlchemy URL such as sqlite:///"
                            f"experiments.db or postgresql://user@host/db via --store or {STORE_ENV}") from None
        except (OperationalError, DatabaseError) as exc:
            reason = str(exc.orig if getattr(exc, "orig", None) else exc).strip().splitlines()[0]
            raise UserError(f"cannot open store {shown}: {reason}; check --store or {STORE_ENV}") from None
        return store

    def _migrate(self) -> None:
        """Apply Alembic migrations; concurrent openers serialise on a lock so they run once. A store
        migrated by a newer orch is refused: this code would misread it."""
        with self.engine.connect() as conn:
            revision = self._revision(conn)
        if revision == HEAD_REVISION:
            return
        if revision is not None and not any((_MIGRATIONS / "versions").glob(f"{revision}_*.py")):
            raise UserError(f"store {mask_url(self.url)} has schema revision {revision}, newer than this orch knows "
                            f"({HEAD_REVISION}): upgrade orch on this machine (pip install -U orch)")
        from alembic import command
        from alembic.config import Config

        with self._write() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(7406411)"))
            if self._revision(conn) == HEAD_REVISION:
                return
            config = Config()
            config.set_main_option("script_location", str(_MIGRATIONS))
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    @staticmethod
    def _revision(conn: Connection) -> str | None:
        if not conn.dialect.has_table(conn, "alembic_version"):
            return None
        return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite: no lock upgrade races)."""
        with self.engine.connect().execution_options(immediate=True) as conn, conn.begin():
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # --- queueing ------------------------------------------------------------------------------

    def find_by_hash(self, spec_hash: str) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute(select(Run.c.id, Run.c.status).where(Run.c.spec_hash == spec_hash)
                               .order_by(Run.c.id.desc()).limit(1)).first()
        return dict(row._mapping) if row else None

    def add_runs(self, runs: list[tuple[dict[str, Any], str, str]], priority: int = 0,
                 max_attempts: int = 3) -> list[int]:
        """Queue ``(spec, spec_hash, name)`` rows in one transaction: all or nothing."""
        ids = []
        with self._write() as conn:
            for spec, spec_hash, name in runs:
                ids.append(conn.execute(insert(Run).values(
                    uid=uuid.uuid4().hex, name=name, spec=json.dumps(spec, sort_keys=True), spec_hash=spec_hash,
                    status="queued", priority=priority, attempt=0, failures=0, max_attempts=max_attempts,
                    created_at=utcnow(),
                ).returning(Run.c.id)).scalar_one())
        return ids

    def claim(self, worker: str, lease_seconds: float, run_id: int | None = None,
              skip: Collection[int] = ()) -> Claim | None:
        """Take the next queued run (highest priority, then oldest) but those in ``skip``, or the given one if it is
        queued."""
        now = utcnow()
        queued = Run.alias()  # an alias, so the subquery is not correlated with the UPDATE's table
        wanted = [queued.c.id == run_id] if run_id is not None else []
        if skip:
            wanted.append(queued.c.id.not_in(sorted(skip)))
        next_run = (select(queued.c.id).where(queued.c.status == "queued", *wanted)
                    .order_by(queued.c.priority.desc(), queued.c.id).limit(1)
                    .with_for_update(skip_locked=True).scalar_subquery())
        with self._write() as conn:
            row = conn.execute(
                update(Run).where(Run.c.id == next_run, Run.c.status == "queued")
                .values(status="running", attempt=Run.c.attempt + 1, lease_owner=worker,
                        lease_expires_at=now + timedelta(seconds=lease_seconds),
                        started_at=func.coalesce(Run.c.started_at, now), error=None)
                .returning(Run.c.id, Run.c.attempt)
            ).first()
            if row is None:
                return None
            conn.execute(insert(Attempt).values(run_id=row.id, number=row.attempt, worker=worker,
                                                started_at=now, outcome="running"))
        return Claim(row.id, row.attempt)

    def requeue_expired(self) -> list[dict[str, Any]]:
        """Runs whose lease expired (their worker is gone): back to the queue, or failed when out of
        attempts; a run cancelled while its worker was dying just has its attempt closed."""
        now = utcnow()
        expired = (Run.c.lease_owner.is_not(None), Run.c.lease_expires_at < now)
        out = []
        with self._write() as conn:
            rows = conn.execute(select(Run.c.id, Run.c.attempt, Run.c.status, Run.c.failures, Run.c.max_attempts)
                                .where(Run.c.status.in_(("running", "cancelled")), *expired)
                                .with_for_update(skip_locked=True)).all()
            for r in rows:
                exhausted = r.failures + 1 >= r.max_attempts
                error = f"lease expired on attempt {r.attempt} (worker lost)"
                status = "cancelled" if r.status == "cancelled" else "failed" if exhausted else "queued"
                values: dict[str, Any] = {"status": status, "lease_owner": None, "lease_expires_at": None}
                if r.status == "running":
                    values.update(failures=Run.c.failures + 1, error=error, finished_at=now if exhausted else None)
                changed = conn.execute(update(Run).where(Run.c.id == r.id, Run.c.attempt == r.attempt,
                                                         Run.c.status == r.status, *expired).values(**values)).rowcount
                if changed:
                    outcome = "cancelled" if r.status == "cancelled" else "interrupted"
                    self._end_attempt(conn, r.id, r.attempt, outcome, error)
                    out.append({"run_id": r.id, "attempt": r.attempt, "status": status, "error": error})
        return out

    # --- fenced writes by the attempt that holds the run --------------------------------------

    def _fence(self, conn: Connection, claim: Claim, lease_seconds: float | None = None) -> None:
        values: dict[str, Any] = {"attempt": claim.attempt}
        if lease_seconds is not None:
            values["lease_expires_at"] = utcnow() + timedelta(seconds=lease_seconds)
        changed = conn.execute(update(Run).where(Run.c.id == claim.run_id, Run.c.attempt == claim.attempt,
                                                 Run.c.status == "running").values(**values)).rowcount
        if changed != 1:
            raise Fenced(f"run {claim.run_id} attempt {claim.attempt} no longer holds the run")

    def heartbeat(self, claim: Claim, lease_seconds: float) -> bool:
        """Renew the lease; False when the attempt was fenced off (lease lost, run cancelled)."""
        try:
            with self._write() as conn:
                self._fence(conn, claim, lease_seconds)
            return True
        except Fenced:
            return False

    def log_metrics(self, claim: Claim, rows: list[tuple[int, str, float]]) -> None:
        """``(step, name, value)`` rows; a step logged again (after a resume) replaces the old value."""
        if not rows:
            return
        with self._write() as conn:
            self._fence(conn, claim)
            for step, name, _value in rows:
                conn.execute(delete(Metric).where(Metric.c.run_id == claim.run_id, Metric.c.name == name,
                                                  Metric.c.step == step))
            conn.execute(insert(Metric), [{"run_id": claim.run_id, "step": s, "name": n, "value": v}
                                          for s, n, v in rows])

    def forget_after(self, claim: Claim, step: int) -> None:
        """A resumed attempt restarts at ``step``: drop what a dead attempt logged after it."""
        with self._write() as conn:
            self._fence(conn, claim)
            conn.execute(delete(Metric).where(Metric.c.run_id == claim.run_id, Metric.c.step > step))

    def add_checkpoint(self, claim: Claim, step: int, path: str, keep: int = 2) -> list[str]:
        """Mark a fully written checkpoint valid; returns the paths of older ones to delete."""
        with self._write() as conn:
            self._fence(conn, claim)
            conn.execute(insert(Checkpoint).values(run_id=claim.run_id, step=step, path=path,
                                                   attempt=claim.attempt, valid=True, created_at=utcnow()))
            valid = conn.execute(select(Checkpoint.c.id, Checkpoint.c.path).where(
                Checkpoint.c.run_id == claim.run_id, Checkpoint.c.valid).order_by(Checkpoint.c.step.desc(),
                                                                               Checkpoint.c.id.desc())).all()
            stale = valid[keep:]
            if stale:
                conn.execute(update(Checkpoint).where(Checkpoint.c.id.in_([s.id for s in stale]))
                             .values(valid=False))
        return [s.path for s in stale if s.path != path]

    def invalidate_checkpoint(self, claim: Claim, path: str) -> None:
        """A checkpoint found damaged is never offered for resuming again."""
        with self._write() as conn:
            self._fence(conn, claim)
            conn.execute(update(Checkpoint).where(Checkpoint.c.run_id == claim.run_id, Checkpoint.c.path == path)
                         .values(valid=False))

    def latest_checkpoint(self, run_id: int) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute(select(Checkpoint.c.step, Checkpoint.c.path).where(
                Checkpoint.c.run_id == run_id, Checkpoint.c.valid).order_by(Checkpoint.c.step.desc(),
                                                                        Checkpoint.c.id.desc()).limit(1)).first()
        return dict(row._mapping) if row else None

    def end_attempt(self, claim: Claim, outcome: str, error: str | None = None) -> str:
        """Close the attempt: ``finished``, ``failed`` (permanent), ``crashed`` (retried while attempts
        remain), ``interrupted`` (its worker was told to stop: queued again, and not counted against
        ``max_attempts``, so preemptions never fail a run) or ``cancelled``. Returns the run's new status. Only
        the attempt that still holds the run (running, or cancelled by the user while it ran) may close it:
        anything else is ``Fenced``."""
        now = utcnow()
        held = (Run.c.id == claim.run_id, Run.c.attempt == claim.attempt, Run.c.status.in_(("running", "cancelled")),
                Run.c.lease_owner.is_not(None))
        with self._write() as conn:
            run = conn.execute(select(Run.c.status, Run.c.failures, Run.c.max_attempts).where(*held)
                               .with_for_update()).first()  # the row lock orders this with a requeue
            if run is None:
                raise Fenced(f"run {claim.run_id} attempt {claim.attempt} no longer holds the run")
            if run.status == "cancelled":
                outcome = "cancelled"
            if outcome == "crashed":
                status = "failed" if run.failures + 1 >= run.max_attempts else "queued"
            else:
                status = {"finished": "finished", "failed": "failed", "cancelled": "cancelled",
                          "interrupted": "queued"}[outcome]
            conn.execute(update(Run).where(*held).values(
                status=status, lease_owner=None, lease_expires_at=None,
                error=Run.c.error if status == "cancelled" else error,  # the cancel reason; the attempt keeps its own
                failures=Run.c.failures + (1 if outcome in ("crashed", "failed") else 0),
                finished_at=None if status == "queued" else now))
            self._end_attempt(conn, claim.run_id, claim.attempt, outcome, error)
        return status

    @staticmethod
    def _end_attempt(conn: Connection, run_id: int, number: int, outcome: str, error: str | None) -> None:
        conn.execute(update(Attempt).where(Attempt.c.run_id == run_id, Attempt.c.number == number,
                                           Attempt.c.outcome == "running")
                     .values(outcome=outcome, error=error, ended_at=utcnow()))

    # --- user commands ---------------------------------------------------------------------------

    def cancel(self, run_id: int) -> str:
        with self._write() as conn:
            status = conn.execute(select(Run.c.status).where(Run.c.id == run_id)).scalar()
            if status is None:
                raise UserError(f"there is no run {run_id}: see `orch ls`")
            if status in ("finished", "failed", "cancelled"):
                raise UserError(f"run {run_id} is already {status}; nothing to cancel")
            conn.execute(update(Run).where(Run.c.id == run_id).values(status="cancelled", finished_at=utcnow(),
                                                                    error="cancelled by the user"))
        return status

    def resume(self, run_id: int, gpus: int | None = None) -> None:
        """Queue a failed or cancelled run again. ``gpus`` changes how many training processes it resumes on
        (its checkpoint is converted when ZeRO partitioned it); the global batch and the spec hash stay: it is
        the same experiment, whose results change only in the last fp32 digits."""
        with self._write() as conn:
            row = conn.execute(select(Run.c.status, Run.c.spec).where(Run.c.id == run_id)).first()
            if row is None:
                raise UserError(f"there is no run {run_id}: see `orch ls`")
            if row.status not in ("failed", "cancelled"):
                raise UserError(f"run {run_id} is {row.status}; only failed or cancelled runs can be resumed")
            values: dict[str, Any] = {"status": "queued", "failures": 0, "error": None, "finished_at": None}
            if gpus is not None:
                spec = json.loads(row.spec)
                trainer = spec["trainer"]
                if gpus < 1 or trainer["batch_size"] % (gpus * trainer["accum"]):
                    raise UserError(f"--gpus {gpus}: run {run_id}'s --batch-size {trainer['batch_size']} is not "
                                    f"divisible by --gpus x --accum = {gpus * trainer['accum']}")
                trainer["gpus"] = gpus
                values["spec"] = json.dumps(spec, sort_keys=True)
            conn.execute(update(Run).where(Run.c.id == run_id).values(**values))

    def runs(self, statuses: tuple[str, ...] = (), limit: int = 0) -> list[dict[str, Any]]:
        query = select(Run).order_by(Run.c.id.desc())
        if statuses:
            query = query.where(Run.c.status.in_(statuses))
        if limit:
            query = query.limit(limit)
        with self._read() as conn:
            return [_run_dict(r) for r in conn.execute(query).all()]

    def run(self, run_id: int) -> dict[str, Any]:
        with self._read() as conn:
            row = conn.execute(select(Run).where(Run.c.id == run_id)).first()
        if row is None:
            raise UserError(f"there is no run {run_id}: see `orch ls`")
        return _run_dict(row)

    def attempts(self, run_id: int) -> list[dict[str, Any]]:
        with self._read() as conn:
            rows = conn.execute(select(Attempt).where(Attempt.c.run_id == run_id).order_by(Attempt.c.number)).all()
        return [dict(r._mapping) for r in rows]

    def metrics(self, run_id: int) -> list[dict[str, Any]]:
        with self._read() as conn:
            rows = conn.execute(select(Metric.c.step, Metric.c.name, Metric.c.value)
                                .where(Metric.c.run_id == run_id).order_by(Metric.c.name, Metric.c.step)).all()
        return [dict(r._mapping) for r in rows]

    def progress(self, run_id: int) -> dict[str, float]:
        """The training scalars at the last logged step, with ``step``; empty before the first log."""
        with self._read() as conn:
            step = conn.execute(select(func.max(Metric.c.step)).where(Metric.c.run_id == run_id,
                                                                    Metric.c.name == "train/loss")).scalar()
            if step is None:
                return {}
            rows = conn.execute(select(Metric.c.name, Metric.c.value).where(Metric.c.run_id == run_id,
                                                                        Metric.c.step == step)).all()
        return {"step": step, **{r.name: r.value for r in rows}}

    def final_metrics(self, run_id: int) -> dict[str, float]:
        """The last value of every metric."""
        return self.final_metrics_of([run_id]).get(run_id, {})

    def final_metrics_of(self, run_ids: list[int]) -> dict[int, dict[str, float]]:
        """The last value of every metric of several runs, in one query (``orch ls``)."""
        last = (select(Metric.c.run_id, Metric.c.name, func.max(Metric.c.step).label("step"))
                .where(Metric.c.run_id.in_(run_ids)).group_by(Metric.c.run_id, Metric.c.name).subquery())
        query = select(Metric.c.run_id, Metric.c.name, Metric.c.value).join(last, and_(
            Metric.c.run_id == last.c.run_id, Metric.c.name == last.c.name, Metric.c.step == last.c.step))
        out: dict[int, dict[str, float]] = {}
        with self._read() as conn:
            for row in conn.execute(query):
                out.setdefault(row.run_id, {})[row.name] = row.value
        return out


def _run_dict(row: Any) -> dict[str, Any]:
    d = dict(row._mapping)
    if "Run" in d:  # select(Run) rows carry the ORM object
        r = d["Run"]
        d = {c.name: getattr(r, c.key) for c in Run.c.__table__.columns}
    d["spec"] = json.loads(d["spec"])
    return d


def _engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    database = parsed.database
    if database and database != ":memory:":
        path = Path(database).expanduser()
        if path.exists() and path.is_dir():
            raise UserError(f"store path {path} is a folder: give a database file, e.g. sqlite:///{path}/experiments.db")
        if not path.parent.exists():
            raise UserError(f"folder {path.parent} of store {url} does not exist: create it or choose another path")
    engine = create_engine(url, connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (see _on_begin)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("immediate") else "BEGIN")

    return engine
