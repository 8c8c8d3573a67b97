"""Queue throughput and correctness: claims per second with K claiming processes, and double claims.

For each backend (SQLite file in a temp dir; a fresh PostgreSQL database, dropped afterwards) and each K:
queue N runs with ``Store.add_runs``, start K processes (multiprocessing spawn) that each loop
``claim`` + ``end_attempt(claim, "finished")`` (a completed run) until ``claim`` returns nothing, and
record every claimed run id. Reported: claims/s (total claims / wall time from the start signal to the
last claim), p50/p99 latency of one claim+end cycle, double claims (ids claimed more than once: must be
0), lost runs (never claimed: must be 0), and a check of the store afterwards (every run finished with
exactly one attempt).

    python bench/queue.py                          # full size: 2000 runs, 1/4/8 processes, both backends
    python bench/queue.py --runs 200 --workers 1,2 --backends sqlite --json /tmp/queue.json
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]  # this file is not the stdlib's queue
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

from bench._common import PG_ADMIN, header, int_list, store_url, str_list, table, write_json  # noqa: E402


def _claimer(url: str, index: int, lease: float, ready: Any, start: Any, results: Any) -> None:
    """One claiming process: claim + end_attempt until the queue is empty; report what it claimed."""
    from orchestrator.store import Store

    store = Store.open(url)
    with store.engine.connect():  # open the pool's first connection before the clock starts
        pass
    ready.put(index)
    start.wait()
    ids: list[int] = []
    latencies: list[float] = []
    errors: list[str] = []
    last = None
    while True:
        began = time.monotonic()
        try:
            claim = store.claim(f"bench-{index}", lease)
            if claim is None:
                break
            store.end_attempt(claim, "finished")
        except Exception as exc:  # noqa: BLE001 - counted and reported; a few in a row end the process
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            if len(errors) >= 20:
                break
            continue
        last = time.monotonic()
        latencies.append(last - began)
        ids.append(claim.run_id)
    store.engine.dispose()
    results.put({"index": index, "ids": ids, "last": last, "latencies": latencies, "errors": errors})


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(backend: str, workers: int, runs: int, lease: float, pg_admin: str, timeout: float) -> dict[str, Any]:
    from sqlalchemy import func, select

    from orchestrator.store import Store
    from orchestrator.store.models import Attempt, Run

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="orch-bench-queue-") as tmp, \
            store_url(backend, Path(tmp), pg_admin) as url:
        store = Store.open(url)
        expected = set(store.add_runs([({"bench": i}, f"{i:064x}", f"bench-{i}") for i in range(runs)]))
        ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
        procs = [ctx.Process(target=_claimer, args=(url, i, lease, ready, start, results), daemon=True)
                 for i in range(workers)]
        for proc in procs:
            proc.start()
        for _ in procs:
            ready.get(timeout=timeout)
        t0 = time.monotonic()
        start.set()
        reports = [results.get(timeout=timeout) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        claimed = Counter(i for r in reports for i in r["ids"])
        lasts = [r["last"] for r in reports if r["last"] is not None]
        wall = (max(lasts) - t0) if lasts else float("nan")
        latencies = [x for r in reports for x in r["latencies"]]
        errors = [e for r in reports for e in r["errors"]]
        with store.engine.connect() as conn:
            not_finished = conn.execute(select(func.count()).select_from(Run)
                                        .where(Run.c.status != "finished")).scalar()
            multi = conn.execute(select(Attempt.c.run_id).group_by(Attempt.c.run_id)
                                 .having(func.count() > 1)).all()
        store.engine.dispose()
    total = sum(claimed.values())
    return {
        "backend": backend, "workers": workers, "runs": runs, "claims": total, "wall_s": wall,
        "claims_per_s": total / wall if wall and wall > 0 else float("nan"),
        "p50_ms": 1000 * _percentile(latencies, 0.5), "p99_ms": 1000 * _percentile(latencies, 0.99),
        "double_claims": sum(1 for c in claimed.values() if c > 1),
        "lost": len(expected - set(claimed)),
        "store_not_finished": not_finished, "store_runs_with_several_attempts": len(multi),
        "per_process_claims": [len(r["ids"]) for r in sorted(reports, key=lambda r: r["index"])],
        "errors": len(errors), "error_samples": sorted(set(errors))[:5],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/queue.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000, help="runs queued per measurement (default 2000)")
    parser.add_argument("--workers", type=int_list, default=[1, 4, 8],
                        help="comma-separated numbers of claiming processes (default 1,4,8)")
    parser.add_argument("--backends", type=str_list, default=["sqlite", "postgresql"],
                        help="comma-separated: sqlite, postgresql (default both)")
    parser.add_argument("--lease", type=float, default=60.0, help="lease seconds given to each claim (default 60)")
    parser.add_argument("--pg-admin", default=PG_ADMIN,
                        help=f"PostgreSQL URL used to create and drop the scratch database (default {PG_ADMIN}; "
                             f"env ORCH_TEST_PG)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a measurement is abandoned")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    info = header("bench/queue.py: claims per second and double claims")
    rows = []
    for backend in args.backends:
        for workers in args.workers:
            result = measure(backend, workers, args.runs, args.lease, args.pg_admin, args.timeout)
            rows.append(result)
            print(f"{backend} x{workers}: {result['claims_per_s']:.0f} claims/s, "
                  f"{result['double_claims']} double, {result['lost']} lost", flush=True)
    print()
    print(table(["backend", "procs", "runs", "claims/s", "p50 ms", "p99 ms", "double claims", "lost",
                 "store: not finished", "store: >1 attempt", "errors", "claims per process"],
                [[r["backend"], r["workers"], r["runs"], r["claims_per_s"], r["p50_ms"], r["p99_ms"],
                  r["double_claims"], r["lost"], r["store_not_finished"], r["store_runs_with_several_attempts"],
                  r["errors"], "/".join(map(str, r["per_process_claims"]))] for r in rows]))
    bad = [r for r in rows if r["double_claims"] or r["lost"] or r["store_not_finished"]
           or r["store_runs_with_several_attempts"]]
    for r in rows:
        for sample in r["error_samples"]:
            print(f"error ({r['backend']} x{r['workers']}): {sample}")
    print("\nclaims/s counts claim + end_attempt cycles (each models one completed run).")
    print("OK: no run claimed twice, none lost" if not bad else f"FAIL: {len(bad)} measurement(s) double-claimed, "
          f"lost or left runs unfinished")
    write_json(args.json, {**info, "results": rows, "ok": not bad})
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
