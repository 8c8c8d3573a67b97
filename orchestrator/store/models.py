"""The tables of the experiment store: runs, attempts, metrics, checkpoints.

SQLAlchemy Core tables, not ORM classes: the store only issues Core statements, and not importing
``sqlalchemy.orm`` keeps ``orch ls`` and ``orch show`` fast. Changing a table means adding an Alembic
revision in ``migrations/versions``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Boolean, Column, DateTime, Float, ForeignKey, Index, Integer, MetaData, String, Table, Text

STATUSES = ("queued", "running", "finished", "failed", "cancelled")


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zone, so every timestamp in the store is UTC without one."""
    return datetime.now(UTC).replace(tzinfo=None)


metadata = MetaData()

Run = Table(
    "runs", metadata,
    Column("id", Integer, primary_key=True),
    Column("uid", String(32), unique=True, nullable=False),
    Column("name", String(512), nullable=False),
    Column("spec", Text, nullable=False),  # canonical JSON of the resolved spec
    Column("spec_hash", String(64), index=True, nullable=False),
    Column("status", String(16), default="queued", nullable=False),
    Column("priority", Integer, default=0, nullable=False),
    Column("attempt", Integer, default=0, nullable=False),  # latest attempt number: the fencing token
    Column("failures", Integer, default=0, nullable=False),  # failed attempts since queued or resumed
    Column("max_attempts", Integer, default=3, nullable=False),
    Column("lease_owner", String(255), nullable=True),
    Column("lease_expires_at", DateTime, nullable=True),
    Column("error", Text, nullable=True),
    Column("created_at", DateTime, default=utcnow, nullable=False),
    Column("started_at", DateTime, nullable=True),
    Column("finished_at", DateTime, nullable=True),
    Index("ix_runs_claim", "status", "priority", "id"),
)

Attempt = Table(
    "attempts", metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", ForeignKey("runs.id", ondelete="CASCADE"), index=True, nullable=False),
    Column("number", Integer, nullable=False),
    Column("worker", String(255), nullable=False),
    Column("started_at", DateTime, default=utcnow, nullable=False),
    Column("ended_at", DateTime, nullable=True),
    Column("outcome", String(16), default="running", nullable=False),
    Column("error", Text, nullable=True),
)

Metric = Table(
    "metrics", metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step", Integer, nullable=False),
    Column("name", String(255), nullable=False),
    Column("value", Float, nullable=False),
    Index("ix_metrics_run_name_step", "run_id", "name", "step"),
)

Checkpoint = Table(
    "checkpoints", metadata,
    Column("id", Integer, primary_key=True),
    Column("run_id", ForeignKey("runs.id", ondelete="CASCADE"), index=True, nullable=False),
    Column("step", Integer, nullable=False),
    Column("path", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("valid", Boolean, default=False, nullable=False),
    Column("created_at", DateTime, default=utcnow, nullable=False),
)
