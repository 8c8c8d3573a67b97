"""Reliability under concurrency: K worker processes and N short runs, each run executed exactly once.

``--mode store`` (default; 8 processes, 500 runs): each process runs the worker's claim loop against the
Store API the way ``Worker.loop`` / ``Worker._follow`` / ``Worker._finish`` use it (``requeue_expired``,
``claim`` with a short lease, ``heartbeat`` every max(1, lease/4) s while a simulated run of random length
"trains", ``end_attempt(claim, "finished")``, or, when a heartbeat is refused, ``end_attempt(claim,
"cancelled")`` as ``Worker._finish`` does after stopping its ranks), polling until no run is queued or
running. Meanwhile a supervisor SIGKILLs random processes (and, with ``--pause-fraction``, SIGSTOPs
some past their lease and SIGCONTs them later: a stalled worker) and restarts killed ones. Afterwards
every run must be finished, with exactly one finished attempt, all other attempts interrupted, and no
run may have been finished by two workers. Before the chaos run, deterministic fencing probes check
what a worker whose lease expired can still do to its run (see ``fence_probes``).

``--mode real`` (16 runs, 2 workers): real ``orch worker`` subprocesses training real short runs
(``orch queue --steps 1 --batch-size 16`` with 1-layer encoders, ``--seed 0..N-1``, ``--eval zs``);
each run must finish with exactly one attempt and be reported finished by exactly one worker.

    python bench/concurrency.py                                   # store mode, full size, both backends
    python bench/concurrency.py --runs 40 --workers 4 --backends sqlite
    python bench/concurrency.py --mode real                       # 16 real runs, 2 workers
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import multiprocessing as mp  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from typing import Any  # noqa: E402

from bench._common import PG_ADMIN, header, orch_command, store_url, str_list, table, write_json  # noqa: E402

REAL_SPEC = ["--steps", "1", "--batch-size", "16", "--encoder", "vit:depth=1,width=32,embed_dim=32",
             "--text-encoder", "text-transformer:depth=1,width=32,embed_dim=32", "--eval", "zs"]


# --- fencing probes ---------------------------------------------------------------------------------

def fence_probes(url: str) -> list[dict[str, Any]]:
    """What can an attempt whose lease expired still do to its run? Each probe forces one interleaving.

    1. Its lease expired and another worker requeued the run (not yet re-claimed): heartbeat, log_metrics
       and add_checkpoint must be fenced, and so must end_attempt(..., "finished") and the
       end_attempt(..., "cancelled") that Worker._finish calls when its heartbeat was refused.
    2. Its end_attempt has read the run (same attempt number: passes the fence) when another worker
       requeues and re-claims the run; then its UPDATE goes through. It must not change the new attempt's
       run (SQLite serialises the two with BEGIN IMMEDIATE; PostgreSQL does not, under READ COMMITTED).
    """
    from sqlalchemy import event

    from orchestrator.store import Fenced, Store

    out = []
    old, other = Store.open(url), Store.open(url)

    def attempt_outcomes(store: Store, run_id: int) -> list[str]:
        return [a["outcome"] for a in store.attempts(run_id)]

    # 1: fenced writes after requeue, before a re-claim
    run_id = old.add_runs([({"probe": 1}, "p" * 64, "probe-1")])[0]
    claim = old.claim("old-worker", 0.2, run_id=run_id)
    time.sleep(0.4)
    other.requeue_expired()
    observed = {"heartbeat": "renewed" if old.heartbeat(claim, 10) else "fenced"}
    for name, call in (("log_metrics", lambda: old.log_metrics(claim, [(1, "train/loss", 1.0)])),
                       ("add_checkpoint", lambda: old.add_checkpoint(claim, 1, "/nonexistent/step-1"))):
        try:
            call()
            observed[name] = "accepted"
        except Fenced:
            observed[name] = "fenced"
    out.append({"probe": "heartbeat/log_metrics/add_checkpoint after lease expiry and requeue",
                "expected": "all fenced", "observed": ", ".join(f"{k} {v}" for k, v in observed.items()),
                "ok": set(observed.values()) == {"fenced"}})
    try:
        status = old.end_attempt(claim, "finished")
        observed_end = f"accepted: run {status}"
    except Fenced:
        observed_end = "fenced"
    run = other.run(run_id)
    state = f"run {run['status']}, attempts {attempt_outcomes(other, run_id)}"
    out.append({"probe": "end_attempt(finished) after lease expiry and requeue, before a re-claim",
                "expected": "Fenced; run stays queued, attempts ['interrupted']",
                "observed": f"{observed_end}; {state}", "ok": observed_end == "fenced" and run["status"] == "queued"})

    # 1b: what Worker._finish does when its heartbeat was refused (held=False): end_attempt(..., "cancelled")
    run_id = old.add_runs([({"probe": 3}, "r" * 64, "probe-1b")])[0]
    claim = old.claim("old-worker", 0.2, run_id=run_id)
    time.sleep(0.4)
    other.requeue_expired()
    refused = not old.heartbeat(claim, 10)
    try:
        observed_end = f"accepted: run {old.end_attempt(claim, 'cancelled')}"
    except Fenced:
        observed_end = "fenced"
    run = other.run(run_id)
    out.append({"probe": "lease lost, requeued, not yet re-claimed: the old worker's heartbeat is refused and it "
                         "ends its attempt as Worker._finish does (end_attempt 'cancelled')",
                "expected": "Fenced; run stays queued (it was never cancelled by the user)",
                "observed": f"heartbeat {'refused' if refused else 'renewed'}; end_attempt {observed_end}; run "
                            f"{run['status']}, attempts {attempt_outcomes(other, run_id)}",
                "ok": observed_end == "fenced" and run["status"] == "queued"})

    # 2: end_attempt's read passes the fence, then the run is requeued and re-claimed before its write
    run_id = old.add_runs([({"probe": 2}, "q" * 64, "probe-2")])[0]
    claim = old.claim("old-worker", 0.2, run_id=run_id)
    time.sleep(0.4)
    reached, release = threading.Event(), threading.Event()

    def hold(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if threading.current_thread().name == "probe-old" and statement.lstrip().upper().startswith("UPDATE RUNS"):
            reached.set()
            release.wait(10)

    event.listen(old.engine, "before_cursor_execute", hold)
    result: dict[str, Any] = {}

    def finish_old() -> None:
        try:
            result["old"] = f"accepted: run {old.end_attempt(claim, 'finished')}"
        except Fenced:
            result["old"] = "fenced"

    def requeue_and_claim() -> None:
        other.requeue_expired()
        result["new"] = other.claim("new-worker", 60, run_id=run_id)

    t_old = threading.Thread(target=finish_old, name="probe-old")
    t_old.start()
    reached.wait(10)
    t_new = threading.Thread(target=requeue_and_claim, name="probe-new")
    t_new.start()
    t_new.join(2)  # SQLite: blocks on the old transaction's write lock until it is released
    interleaved = not t_new.is_alive()
    release.set()
    t_old.join()
    t_new.join()
    event.remove(old.engine, "before_cursor_execute", hold)
    run = other.run(run_id)
    new = result.get("new")
    state = f"run {run['status']} (attempt {run['attempt']}), attempts {attempt_outcomes(other, run_id)}"
    if new is not None:
        state += f"; new attempt's heartbeat {'renewed' if other.heartbeat(new, 60) else 'fenced'}"
    fenced = result["old"] == "fenced" and run["status"] == "running"
    serialised = result["old"].startswith("accepted") and run["status"] == "finished" and new is None
    ok = fenced or serialised  # never both: a finished run with a live new attempt is the failure
    out.append({"probe": "end_attempt(finished) whose read passed the fence, racing a requeue + re-claim",
                "expected": "either the old attempt is fenced and the new one keeps the run, or the requeue waits "
                            "for (SQLite) or skips (PostgreSQL row lock) the run the old attempt holds and the old "
                            "attempt finishes it; never a finished run with a live new attempt",
                "observed": f"requeue+claim {'ran in between' if interleaved else 'waited'}; old end_attempt "
                            f"{result['old']}; {state}", "ok": ok})
    old.engine.dispose()
    other.engine.dispose()
    return out


# --- store mode: the claim loop under SIGKILL / SIGSTOP ----------------------------------------------

def _open_runs(store: Any) -> int:
    from sqlalchemy import func, select

    from orchestrator.store.models import Run

    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(Run)
                            .where(Run.c.status.in_(("queued", "running")))).scalar()


def _store_worker(url: str, wid: str, lease: float, run_seconds: tuple[float, float], seed: int,
                  journal: str, poll: float) -> None:
    """Worker.loop with a simulated run: reap, claim, heartbeat while 'training', end the attempt."""
    from orchestrator.store import Fenced, Store

    rng = random.Random(seed)
    store = Store.open(url)
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(event: str, run_id: int = 0, attempt: int = 0, extra: str = "") -> None:
        os.write(fd, f"{time.time():.6f} {wid} {event} {run_id} {attempt} {extra}\n".encode())

    note("start")
    beat = max(1.0, lease / 4)  # as Worker._follow
    while True:
        try:
            for lost in store.requeue_expired():
                note("requeued", lost["run_id"], lost["attempt"], lost["status"])
            claim = store.claim(wid, lease)
        except Exception as exc:  # noqa: BLE001 - a store error is reported, the loop goes on
            note("error", extra=type(exc).__name__)
            time.sleep(poll)
            continue
        if claim is None:
            if _open_runs(store) == 0:
                break
            time.sleep(poll)
            continue
        note("claimed", claim.run_id, claim.attempt)
        end = time.monotonic() + rng.uniform(*run_seconds)
        last_beat, held = time.monotonic(), True
        while time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
            if time.monotonic() - last_beat >= beat:
                last_beat = time.monotonic()
                if not store.heartbeat(claim, lease):
                    held = False
                    break
        if not held:  # Worker._follow stops the ranks; Worker._finish then ends the attempt as "cancelled"
            note("lease-lost", claim.run_id, claim.attempt)
            try:
                status = store.end_attempt(claim, "cancelled")
                note("cancelled-after-lease-loss", claim.run_id, claim.attempt, status)
            except Fenced:
                note("fenced-at-end", claim.run_id, claim.attempt)
            continue
        try:
            status = store.end_attempt(claim, "finished")
            note("finished", claim.run_id, claim.attempt, status)
        except Fenced:
            note("fenced-at-end", claim.run_id, claim.attempt)
    note("exit")
    store.engine.dispose()


def chaos(backend: str, url: str, args: argparse.Namespace, journal_dir: Path) -> dict[str, Any]:
    from orchestrator.store import Store

    rng = random.Random(args.seed)
    ctx = mp.get_context("spawn")
    store = Store.open(url)
    ids = store.add_runs([({"bench": i}, f"{i:064x}", f"bench-{i}") for i in range(args.runs)],
                         max_attempts=args.max_attempts)
    journal = str(journal_dir / f"journal-{backend}.log")
    procs: dict[int, Any] = {}
    names: dict[int, str] = {}
    generation: Counter[int] = Counter()
    restart_at: dict[int, float] = {}
    paused: dict[int, float] = {}
    paused_names: set[str] = set()
    killed_names: set[str] = set()
    counts: Counter[str] = Counter()

    def start(slot: int) -> None:
        generation[slot] += 1
        names[slot] = f"w{slot}.{generation[slot]}"
        procs[slot] = ctx.Process(target=_store_worker, daemon=True, args=(
            url, names[slot], args.lease, args.run_seconds, rng.randrange(2**31), journal, args.poll))
        procs[slot].start()

    t0 = time.monotonic()
    for slot in range(args.workers):
        start(slot)
    next_chaos = t0 + rng.expovariate(1 / args.chaos_every)
    while _open_runs(store):
        now = time.monotonic()
        if now - t0 > args.timeout:
            counts["timed_out"] += 1
            break
        for slot, resume in list(paused.items()):
            if now >= resume:
                os.kill(procs[slot].pid, signal.SIGCONT)
                del paused[slot]
        for slot, proc in procs.items():
            if not proc.is_alive() and slot not in restart_at and slot not in paused:
                restart_at[slot] = now + rng.uniform(0, args.restart_delay)
        for slot, when in list(restart_at.items()):
            if now >= when:
                del restart_at[slot]
                start(slot)
                counts["restarts"] += 1
        if now >= next_chaos:
            live = [s for s, p in procs.items() if p.is_alive() and s not in paused]
            if live:
                slot = rng.choice(live)
                if rng.random() < args.pause_fraction:
                    os.kill(procs[slot].pid, signal.SIGSTOP)
                    paused[slot] = now + rng.uniform(1.5 * args.lease, 3 * args.lease)
                    paused_names.add(names[slot])
                    counts["pauses"] += 1
                else:
                    os.kill(procs[slot].pid, signal.SIGKILL)
                    procs[slot].join()
                    killed_names.add(names[slot])
                    counts["kills"] += 1
            next_chaos = now + rng.expovariate(1 / args.chaos_every)
        time.sleep(0.05)
    wall = time.monotonic() - t0
    for slot in list(paused):
        os.kill(procs[slot].pid, signal.SIGCONT)
    for proc in procs.values():
        proc.join(timeout=max(30, 4 * args.lease))
        if proc.is_alive():
            proc.kill()
            counts["stuck_processes"] += 1
    return {"wall_s": wall, **counts, **_check_store(store, ids, journal, paused_names, killed_names)}


def _check_store(store: Any, ids: list[int], journal: str, paused: set[str], killed: set[str]) -> dict[str, Any]:
    events: Counter[str] = Counter()
    finished_by: defaultdict[int, list[str]] = defaultdict(list)
    lost_alive = 0
    for line in Path(journal).read_text().splitlines():
        _, wid, event, run_id, _attempt, *_ = line.split(" ")
        events[event] += 1
        if event == "finished":
            finished_by[int(run_id)].append(wid)
        if event == "lease-lost" and wid not in paused:
            lost_alive += 1  # lease lost by a worker that was never stopped: heartbeats came too late
    statuses: Counter[str] = Counter()
    violations = []
    attempts_total = 0
    for run_id in ids:
        run = store.run(run_id)
        statuses[run["status"]] += 1
        outcomes = [a["outcome"] for a in store.attempts(run_id)]
        attempts_total += len(outcomes)
        problems = []
        if run["status"] != "finished":
            problems.append(f"status {run['status']}")
        if outcomes.count("finished") != 1:
            problems.append(f"{outcomes.count('finished')} finished attempts")
        if set(outcomes) - {"interrupted", "finished"}:
            problems.append(f"attempt outcomes {outcomes}")
        if outcomes and outcomes[-1] != "finished" and run["status"] == "finished":
            problems.append(f"finished run whose last attempt is {outcomes[-1]}")
        if len(finished_by[run_id]) > 1:
            problems.append(f"finished by {len(finished_by[run_id])} workers ({', '.join(finished_by[run_id])})")
        if problems:
            violations.append(f"run {run_id}: " + "; ".join(problems) + f" (attempts {outcomes})")
    store.engine.dispose()
    return {
        "runs": len(ids), "statuses": dict(statuses), "attempts": attempts_total,
        "finished_exactly_once": len(ids) - len(violations), "violations": violations,
        "claims": events["claimed"], "requeued_by_reaper": events["requeued"], "lease_lost": events["lease-lost"],
        "lease_lost_by_unpaused_worker": lost_alive, "fenced_at_end": events["fenced-at-end"],
        "cancelled_after_lease_loss": events["cancelled-after-lease-loss"],
        "store_errors": events["error"], "killed_workers": len(killed), "paused_workers": len(paused),
    }


# --- real mode: orch worker subprocesses ---------------------------------------------------------

def real(backend: str, url: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from orchestrator.store import Store

    env = {**os.environ, "ORCH_STORE": url, "ORCH_RUNS_DIR": str(workdir / "runs")}
    seeds = [x for s in range(args.runs) for x in ("--seed", str(s))]
    queued = subprocess.run([*orch_command(), "queue", *REAL_SPEC, *seeds], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=600)
    if queued.returncode != 0:
        raise SystemExit(f"orch queue failed: {queued.stderr.strip()}")
    t0 = time.monotonic()
    workers = [subprocess.Popen([*orch_command(), "worker", "--quiet"], cwd=workdir, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(args.workers)]
    outputs = [w.communicate(timeout=args.timeout)[0] for w in workers]
    wall = time.monotonic() - t0
    store = Store.open(url)
    runs = store.runs()
    reported = Counter(int(line.split()[1]) for out in outputs for line in out.splitlines()
                       if line.startswith("run ") and (line.endswith(" finished") or " finished:" in line))
    violations = []
    for run in runs:
        numbers = [(a["number"], a["outcome"]) for a in store.attempts(run["id"])]
        if run["status"] != "finished" or numbers != [(1, "finished")] or reported[run["id"]] != 1:
            violations.append(f"run {run['id']}: {run['status']}, attempts {numbers}, reported finished by "
                              f"{reported[run['id']]} worker(s)")
    store.engine.dispose()
    per_worker = [sum(1 for line in out.splitlines() if line.startswith("run ") and " finished" in line)
                  for out in outputs]
    return {"runs": len(runs), "wall_s": wall, "runs_per_min": 60 * len(runs) / wall,
            "statuses": dict(Counter(r["status"] for r in runs)),
            "finished_exactly_once": len(runs) - len(violations), "violations": violations,
            "worker_exit_codes": [w.returncode for w in workers], "runs_per_worker": per_worker,
            "worker_output_tail": [out.strip().splitlines()[-3:] for out in outputs]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/concurrency.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["store", "real"], default="store", help="default store")
    parser.add_argument("--runs", type=int, default=None, help="runs to queue (default 500 store, 16 real)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default 8 store, 2 real)")
    parser.add_argument("--backends", type=str_list, default=["sqlite", "postgresql"],
                        help="comma-separated: sqlite, postgresql (default both)")
    parser.add_argument("--lease", type=float, default=3.0, help="store mode: lease seconds (default 3)")
    parser.add_argument("--run-seconds", type=lambda s: tuple(float(x) for x in s.split(",")), default=(0.2, 2.0),
                        help="store mode: a simulated run lasts uniform(MIN,MAX) seconds (default 0.2,2.0)")
    parser.add_argument("--chaos-every", type=float, default=2.0,
                        help="store mode: mean seconds between chaos events (default 2)")
    parser.add_argument("--pause-fraction", type=float, default=0.25,
                        help="store mode: fraction of chaos events that SIGSTOP a worker past its lease instead of "
                             "SIGKILLing it (default 0.25; 0 for kills only)")
    parser.add_argument("--restart-delay", type=float, default=1.0,
                        help="store mode: a killed worker is restarted after uniform(0, this) s (default 1)")
    parser.add_argument("--max-attempts", type=int, default=1000,
                        help="store mode: max_attempts of the queued runs (default 1000: chaos never exhausts it)")
    parser.add_argument("--poll", type=float, default=0.2, help="store mode: seconds between polls (default 0.2)")
    parser.add_argument("--no-probes", action="store_true", help="store mode: skip the fencing probes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the chaos schedule (default 0)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before a backend's run is abandoned")
    parser.add_argument("--pg-admin", default=PG_ADMIN, help=f"PostgreSQL admin URL (default {PG_ADMIN})")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    args.runs = args.runs or (500 if args.mode == "store" else 16)
    args.workers = args.workers or (8 if args.mode == "store" else 2)

    info = header(f"bench/concurrency.py --mode {args.mode}: every run executed exactly once")
    results, probes = [], []
    for backend in args.backends:
        with tempfile.TemporaryDirectory(prefix="orch-bench-conc-") as tmp:
            if args.mode == "store" and not args.no_probes:
                with store_url(backend, _mkdir(Path(tmp) / "probe"), args.pg_admin) as url:
                    probes += [{"backend": backend, **p} for p in fence_probes(url)]
            with store_url(backend, Path(tmp), args.pg_admin) as url:
                result = chaos(backend, url, args, Path(tmp)) if args.mode == "store" else real(backend, url, args,
                                                                                                Path(tmp))
            results.append({"backend": backend, "workers": args.workers, **result})
            print(f"{backend}: {result['finished_exactly_once']}/{result['runs']} runs finished exactly once "
                  f"in {result['wall_s']:.1f} s", flush=True)
    print()
    if probes:
        print("Fencing probes (a worker whose lease expired):")
        print(table(["backend", "probe", "expected", "observed", "ok"],
                    [[p["backend"], p["probe"], p["expected"], p["observed"], "ok" if p["ok"] else "FAIL"]
                     for p in probes]))
        print()
    if args.mode == "store":
        print(table(["backend", "procs", "runs", "finished exactly once", "wall s", "attempts", "kills", "pauses",
                     "restarts", "requeued", "lease lost (unpaused)", "fenced at end", "cancelled after lease loss",
                     "store errors"],
                    [[r["backend"], r["workers"], r["runs"], r["finished_exactly_once"], r["wall_s"], r["attempts"],
                      r.get("kills", 0), r.get("pauses", 0), r.get("restarts", 0), r["requeued_by_reaper"],
                      f"{r['lease_lost']} ({r['lease_lost_by_unpaused_worker']})", r["fenced_at_end"],
                      r["cancelled_after_lease_loss"], r["store_errors"]] for r in results]))
    else:
        print(table(["backend", "workers", "runs", "finished exactly once", "wall s", "runs/min", "runs per worker",
                     "exit codes"],
                    [[r["backend"], r["workers"], r["runs"], r["finished_exactly_once"], r["wall_s"], r["runs_per_min"],
                      "/".join(map(str, r["runs_per_worker"])), r["worker_exit_codes"]] for r in results]))
    for r in results:
        for v in r["violations"][:20]:
            print(f"VIOLATION ({r['backend']}): {v}")
        if r.get("timed_out"):
            print(f"TIMED OUT ({r['backend']}) after {args.timeout} s")
    ok = all(not r["violations"] and not r.get("timed_out") for r in results)
    print("\n" + ("OK: every run executed exactly once" if ok else "FAIL: see the violations above")
          + ("" if all(p["ok"] for p in probes) else "; FAIL: fencing probes (see above)"))
    write_json(args.json, {**info, "mode": args.mode, "args": {k: v for k, v in vars(args).items() if k != "json"},
                           "probes": probes, "results": results, "ok": ok and all(p["ok"] for p in probes)})
    return 0 if ok and all(p["ok"] for p in probes) else 1


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    sys.exit(main())
