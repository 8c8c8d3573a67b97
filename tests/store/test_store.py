"""The store and queue against real SQLite and PostgreSQL databases."""

from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest
from sqlalchemy import inspect as sa_inspect

from orchestrator.errors import UserError
from orchestrator.store import Claim, Fenced, Store, mask_url


def _spec(i: int) -> tuple[dict, str, str]:
    return {"i": i}, f"hash{i}", f"run{i}"


def _claim_all(url: str, worker: str, out: mp.Queue) -> None:
    store = Store.open(url)
    claimed = []
    while (claim := store.claim(worker, 60)) is not None:
        claimed.append(claim.run_id)
    out.put(claimed)


@pytest.mark.parametrize("workers", [4])
def test_concurrent_workers_claim_each_run_exactly_once(store_url: str, workers: int) -> None:
    store = Store.open(store_url)
    ids = store.add_runs([_spec(i) for i in range(60)])
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(store_url, f"w{k}", out)) for k in range(workers)]
    for p in procs:
        p.start()
    claimed = [run_id for _ in procs for run_id in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
    assert sorted(claimed) == sorted(ids)  # every run once: no double claim, none lost
    assert all(r["status"] == "running" and r["attempt"] == 1 for r in store.runs())


def test_claim_order_priority_then_age(store_url: str) -> None:
    store = Store.open(store_url)
    low = store.add_runs([_spec(1)])[0]
    high = store.add_runs([_spec(2)], priority=5)[0]
    assert store.claim("w", 60).run_id == high
    assert store.claim("w", 60).run_id == low
    assert store.claim("w", 60) is None


def test_a_claim_passes_over_the_runs_a_worker_left(store_url: str) -> None:
    store = Store.open(store_url)
    first, second, third = store.add_runs([_spec(1), _spec(2), _spec(3)])
    assert store.claim("w", 60, skip={first, second}).run_id == third
    assert store.claim("w", 60, skip={first, second}) is None
    assert store.claim("w", 60, skip={second}).run_id == first


def test_expired_lease_requeues_and_fences_the_old_attempt(store_url: str) -> None:
    store = Store.open(store_url)
    run_id = store.add_runs([_spec(1)])[0]
    old = store.claim("dead-worker", 0.2)
    store.log_metrics(old, [(1, "train/loss", 1.0)])
    time.sleep(0.4)
    lost = store.requeue_expired()
    assert [(x["run_id"], x["status"]) for x in lost] == [(run_id, "queued")]
    new = store.claim("live-worker", 60)
    assert new == Claim(run_id, 2)
    with pytest.raises(Fenced):  # the old attempt comes back: its writes are refused
        store.log_metrics(old, [(2, "train/loss", 0.5)])
    with pytest.raises(Fenced):
        store.add_checkpoint(old, 2, "/nowhere")
    assert not store.heartbeat(old, 60)
    assert store.heartbeat(new, 60)
    assert [a["outcome"] for a in store.attempts(run_id)] == ["interrupted", "running"]


def test_run_that_keeps_crashing_fails_after_max_attempts(store_url: str) -> None:
    store = Store.open(store_url)
    run_id = store.add_runs([_spec(1)], max_attempts=2)[0]
    assert store.end_attempt(store.claim("w", 60), "crashed", "boom") == "queued"
    assert store.end_attempt(store.claim("w", 60), "crashed", "boom again") == "failed"
    run = store.run(run_id)
    assert run["status"] == "failed" and run["error"] == "boom again"
    store.resume(run_id)  # `orch resume` brings it back with a fresh budget
    assert store.claim("w", 60) == Claim(run_id, 3)


def test_an_interrupted_attempt_requeues_the_run_without_spending_an_attempt(store_url: str) -> None:
    """A worker that is told to stop (SIGTERM, Ctrl-C) hands its run back: queued at once, failures unchanged, so
    preemptions never exhaust --max-attempts; a run cancelled meanwhile stays cancelled."""
    store = Store.open(store_url)
    run_id, other = store.add_runs([_spec(1), _spec(2)], max_attempts=1)
    for attempt in (1, 2, 3):
        claim = store.claim("w", 60, run_id=run_id)
        assert claim == Claim(run_id, attempt)
        assert store.end_attempt(claim, "interrupted", "worker stopped (SIGTERM)") == "queued"
        run = store.run(run_id)
        assert (run["status"], run["failures"], run["lease_owner"], run["finished_at"]) == ("queued", 0, None, None)
    assert [(a["outcome"], a["error"]) for a in store.attempts(run_id)] == [
        ("interrupted", "worker stopped (SIGTERM)")] * 3
    claim = store.claim("w", 60, run_id=other)
    store.cancel(other)
    assert store.end_attempt(claim, "interrupted", "worker stopped (SIGINT)") == "cancelled"
    assert store.run(other)["error"] == "cancelled by the user"


def test_cancel_fences_the_running_attempt(store_url: str) -> None:
    store = Store.open(store_url)
    run_id = store.add_runs([_spec(1)])[0]
    claim = store.claim("w", 60)
    store.cancel(run_id)
    assert not store.heartbeat(claim, 60)
    assert store.end_attempt(claim, "crashed") == "cancelled"
    with pytest.raises(UserError, match="already cancelled"):
        store.cancel(run_id)


def test_checkpoints_keep_the_latest_two(store_url: str) -> None:
    store = Store.open(store_url)
    store.add_runs([_spec(1)])
    claim = store.claim("w", 60)
    assert store.latest_checkpoint(claim.run_id) is None
    stale = [store.add_checkpoint(claim, step, f"/ck/{step}") for step in (10, 20, 30)]
    assert stale == [[], [], ["/ck/10"]]
    assert store.latest_checkpoint(claim.run_id) == {"step": 30, "path": "/ck/30"}


def test_metrics_logged_again_after_resume_replace_old_values(store_url: str) -> None:
    store = Store.open(store_url)
    store.add_runs([_spec(1)])
    claim = store.claim("w", 60)
    store.log_metrics(claim, [(s, "train/loss", float(s)) for s in (10, 20, 30)])
    store.forget_after(claim, 20)
    store.log_metrics(claim, [(20, "train/loss", 2.0), (30, "train/loss", 3.0)])
    assert [(m["step"], m["value"]) for m in store.metrics(claim.run_id)] == [(10, 10.0), (20, 2.0), (30, 3.0)]
    assert store.progress(claim.run_id) == {"step": 30, "train/loss": 3.0}


def _open(url: str, out: mp.Queue) -> None:
    try:
        Store.open(url)
        out.put("ok")
    except Exception as exc:  # noqa: BLE001
        out.put(repr(exc))


def test_two_processes_opening_a_new_store_migrate_it_once(store_url: str) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_open, args=(store_url, out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    assert results == ["ok"] * 3
    store = Store.open(store_url)
    tables = set(sa_inspect(store.engine).get_table_names())
    assert {"runs", "attempts", "metrics", "checkpoints", "alembic_version"} <= tables


def test_sqlite_store_uses_wal(sqlite_url: str) -> None:
    store = Store.open(sqlite_url)
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


@pytest.mark.parametrize("url, message", [
    ("postgresql+psycopg://nobody:secret@127.0.0.1:1/db", "cannot open store"),
    ("notadialect://x", "is not valid"),
    ("sqlite:////no/such/folder/e.db", "does not exist"),
])
def test_bad_store_urls_are_one_line_user_errors(url: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        Store.open(url)
    assert "\n" not in str(err.value) and "secret" not in str(err.value)


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.db"
    bogus.write_text("these are my notes, not a database " * 100)
    with pytest.raises(UserError, match="cannot open store"):
        Store.open(f"sqlite:///{bogus}")
    assert bogus.read_text().startswith("these are my notes")


def test_mask_url_hides_the_password() -> None:
    assert mask_url("postgresql://me:hunter2@db/x") == "postgresql://me:***@db/x"


def test_a_store_from_a_newer_orch_is_refused_with_a_hint(sqlite_url: str) -> None:
    store = Store.open(sqlite_url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(UserError, match="revision 9999, newer than this orch knows .*upgrade orch"):
        Store.open(sqlite_url)


def test_an_older_schema_is_migrated_on_open(sqlite_url: str) -> None:
    store = Store.open(sqlite_url)
    with store.engine.begin() as conn:  # an empty store made before any revision existed
        for table in ("checkpoints", "metrics", "attempts", "runs", "alembic_version"):
            conn.exec_driver_sql(f"DROP TABLE {table}")
    reopened = Store.open(sqlite_url)
    assert reopened.add_runs([_spec(1)]) == [1]


@pytest.mark.parametrize("outcome", ["finished", "cancelled", "crashed", "failed", "interrupted"])
def test_a_requeued_attempt_cannot_end_the_run(store_url: str, outcome: str) -> None:
    """The old worker comes back after its run was requeued (and before anyone re-claimed it)."""
    store = Store.open(store_url)
    run_id = store.add_runs([_spec(1)])[0]
    old = store.claim("stalled-worker", 0.2)
    time.sleep(0.4)
    assert store.requeue_expired()[0]["status"] == "queued"
    with pytest.raises(Fenced):
        store.end_attempt(old, outcome)
    run = store.run(run_id)
    assert (run["status"], run["failures"]) == ("queued", 1)
    assert store.claim("live-worker", 60) == Claim(run_id, 2)


def test_a_run_cancelled_while_its_worker_died_is_closed(store_url: str) -> None:
    store = Store.open(store_url)
    run_id = store.add_runs([_spec(1)])[0]
    store.claim("dying-worker", 0.2)
    store.cancel(run_id)
    time.sleep(0.4)
    assert [(x["run_id"], x["status"]) for x in store.requeue_expired()] == [(run_id, "cancelled")]
    run = store.run(run_id)
    assert run["status"] == "cancelled" and run["lease_owner"] is None and run["error"] == "cancelled by the user"
    assert [a["outcome"] for a in store.attempts(run_id)] == ["cancelled"]
    assert store.requeue_expired() == []


def test_final_metrics_of_several_runs_take_each_metrics_last_step(store_url: str) -> None:
    store = Store.open(store_url)
    store.add_runs([_spec(1), _spec(2), _spec(3)])
    first, second = store.claim("w", 60), store.claim("w", 60)
    store.log_metrics(first, [(10, "train/loss", 3.0), (20, "train/loss", 2.0), (20, "zs/top1", 50.0)])
    store.log_metrics(second, [(5, "train/loss", 9.0), (7, "zs/top1", 11.0), (6, "zs/top1", 99.0)])
    assert store.final_metrics_of([first.run_id, second.run_id, 3]) == {
        first.run_id: {"train/loss": 2.0, "zs/top1": 50.0}, second.run_id: {"train/loss": 9.0, "zs/top1": 11.0}}


def test_migrations_create_exactly_the_declared_tables(store_url: str) -> None:
    """The tables in models.py and the Alembic revisions must not drift apart (autogenerate finds no diff)."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from orchestrator.store.models import metadata

    store = Store.open(store_url)
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
