"""A worker killed with SIGKILL at random moments: the run resumes and ends exactly like an uninterrupted one.

Once, at the start, an uninterrupted reference run of the spec below is executed (``orch queue`` +
``orch worker``) while the store is polled, which gives its metrics and a timeline (claim, logged steps,
checkpoints, evaluations). Then, per trial, in a fresh working directory: queue the same run, start
``orch worker --lease 3 --quiet``, SIGKILL it at a seeded random moment aimed at one phase (cycling
through: right after the claim, mid-training, mid-checkpoint-write, mid-evaluation, and a uniformly
random delay over the reference run's duration), wait for its orphaned training processes to exit (they
die with their parent via PR_SET_PDEATHSIG), sleep past the lease, and run ``orch worker --quiet`` to
finish. A trial passes when the run finished exactly once (attempts: interrupted..., finished), its
metrics have no duplicate steps, its final metrics (except the wall-clock `TIMING_METRICS`)
equal the reference's bitwise (the three core checks), and it logged the same (name, step) pairs as the
reference (no evaluation lost to the kill); the summary counts both. The phase actually hit
is read from the store, the checkpoint folder and the attempt log at the moment of the kill.

    python bench/kill.py                     # 20 trials
    python bench/kill.py --trials 2 --json /tmp/kill.json
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from bench._common import header, orch_command, table, write_json  # noqa: E402
from orchestrator.runinfo import TIMING_METRICS  # noqa: E402

SPEC = ["--encoder", "vit:depth=1,width=64,embed_dim=64", "--text-encoder",
        "text-transformer:depth=1,width=64,embed_dim=64", "--batch-size", "64",
        "--steps", "40", "--checkpoint-every", "10", "--eval-every", "20", "--log-every", "10"]
STEPS, CHECKPOINT_EVERY, EVAL_EVERY = 40, 10, 20
PHASES = ["claim", "step", "checkpoint", "eval", "random"]
CORE_CHECKS = ("status finished", "attempts interrupted..., finished", "no duplicate steps",
               "final metrics bitwise equal")
LEASE = 3.0
RUN_ID = 1
CLEAN_ENV = ("ORCH_STORE", "ORCH_RUNS_DIR", "MLFLOW_TRACKING_URI", "ORCH_IMAGENET_ROOT", "ORCH_DISABLE_PLUGINS")


def env() -> dict[str, str]:
    """Each working directory has its own default store, runs folder and MLflow store."""
    return {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}


def orch(*args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*orch_command(), *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def start_worker(cwd: Path, *args: str) -> subprocess.Popen:
    with open(cwd / "worker.out", "ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([*orch_command(), "worker", "--quiet", *args], cwd=cwd, env=env(), stdout=out,
                                stderr=subprocess.STDOUT)


def open_store(cwd: Path) -> Any:
    from orchestrator.store import Store

    return Store.open(f"sqlite:///{cwd}/experiments.db")


def comparable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k not in TIMING_METRICS}  # wall-clock, not results


def series(store: Any) -> list[tuple[str, int, float]]:
    return [(m["name"], m["step"], m["value"]) for m in store.metrics(RUN_ID) if m["name"] not in TIMING_METRICS]


def snapshot(store: Any, cwd: Path) -> dict[str, Any]:
    """What the store, the checkpoint folder and the attempt log say about the run right now."""
    from sqlalchemy import select

    from orchestrator.store.models import Checkpoint

    attempts = store.attempts(RUN_ID)
    with store.engine.connect() as conn:
        query = select(Checkpoint.c.step).where(Checkpoint.c.run_id == RUN_ID)
        registered = sorted(r.step for r in conn.execute(query))
    rows = store.metrics(RUN_ID)
    lines: list[str] = []
    if attempts:
        log = cwd / "runs" / str(RUN_ID) / f"attempt-{attempts[-1]['number']}.log"
        if log.is_file():
            lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    progress_lines = [line for line in lines if re.match(r"step \d+/\d+", line)]
    return {
        "status": store.run(RUN_ID)["status"],
        "attempts": [a["outcome"] for a in attempts],
        "step": max((m["step"] for m in rows if m["name"] == "train/loss"), default=0),
        "eval_steps": sorted({m["step"] for m in rows if not m["name"].startswith("train/")}),
        "registered": registered, "on_disk": on_disk(cwd),
        "log_last_step": progress_lines[-1][:80] if progress_lines else "", "log_end": [x[:200] for x in lines[-5:]],
    }


def on_disk(cwd: Path) -> list[int]:
    """Steps of the checkpoint folders that exist (whole, or being written): a quick look, taken at the kill."""
    folder = cwd / "runs" / str(RUN_ID) / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*")) if folder.is_dir() else []


def phase_of(snap: dict[str, Any]) -> str:
    """The phase a kill hit: ``snap`` is the killed attempt's final store state, with ``on_disk`` the checkpoint
    folders that existed at the kill (a folder never registered was being written)."""
    if not snap["attempts"]:
        return "before claim"
    if snap["status"] != "running" or snap["attempts"][-1] != "running":
        return f"after the attempt ended ({snap['status']})"
    writing = sorted(set(snap["on_disk"]) - set(snap["registered"]))
    if writing:
        return f"mid-checkpoint-write (step {writing[-1]})"
    last = snap["registered"][-1] if snap["registered"] else 0
    if last == STEPS:
        return "final evaluation / finishing"
    if last and last == snap["step"] and last % EVAL_EVERY == 0 and last not in snap["eval_steps"]:
        return f"mid-evaluation (step {last})"
    if snap["step"] == 0:
        return "claimed, before the first logged step (launch, build, steps 1-9)"
    return f"mid-training (last logged step {snap['step']})"


def wait_for(predicate: Callable[[], bool], timeout: float, poll: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll)
    return True


def training_processes(run_dir: Path) -> list[Any]:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
        except psutil.Error:
            continue
        if "orchestrator.engine.train" in cmd and str(run_dir) in cmd:
            found.append(proc)
    return found


def reference(cwd: Path) -> dict[str, Any]:
    """The uninterrupted run: its metrics, its duration and when each event happened (from the store)."""
    cwd.mkdir(parents=True, exist_ok=True)
    queued = orch("queue", *SPEC, cwd=cwd)
    if queued.returncode != 0:
        raise SystemExit(f"orch queue failed: {queued.stderr.strip()}")
    store = open_store(cwd)
    t0 = time.monotonic()
    worker = start_worker(cwd)
    timeline: dict[str, float] = {}
    while worker.poll() is None:
        snap = snapshot(store, cwd)
        now = time.monotonic() - t0
        events = [f"step {snap['step']}", *(f"checkpoint {s}" for s in snap["registered"]),
                  *(f"eval {s}" for s in snap["eval_steps"]), *(f"writing {s}" for s in snap["on_disk"])]
        if snap["attempts"]:
            events.append("claimed")
        for e in events:
            timeline.setdefault(e, now)
        time.sleep(0.05)
    duration = time.monotonic() - t0
    timeline.setdefault("exited", duration)
    if worker.returncode != 0 or store.run(RUN_ID)["status"] != "finished":
        raise SystemExit(f"the reference run failed: see {cwd}/worker.out")
    out = {"duration_s": duration, "timeline": dict(sorted(timeline.items(), key=lambda kv: kv[1])),
           "final": comparable(store.final_metrics(RUN_ID)), "series": series(store)}
    store.engine.dispose()
    return out


def _window(ref: dict[str, Any], start: str, end: str, default: float) -> float:
    t = ref["timeline"]
    return max(0.05, t[end] - t[start]) if start in t and end in t else default


def kill_moment(phase: str, rng: random.Random, ref: dict[str, Any], store: Any, cwd: Path,
                t0: float) -> tuple[Callable[[], bool], float, float, str]:
    """(event to wait for, its polling interval, extra delay after it, description) for a kill aimed at ``phase``."""
    folder = cwd / "runs" / str(RUN_ID) / "checkpoints"
    if phase == "claim":
        return (lambda: bool(store.attempts(RUN_ID))), 0.02, rng.uniform(0, 2.0), "after the claim"
    if phase == "step":
        at = rng.choice([s for s in range(CHECKPOINT_EVERY, STEPS, CHECKPOINT_EVERY)])
        span = _window(ref, f"step {at}", f"step {at + CHECKPOINT_EVERY}", 1.0)
        return (lambda: store.progress(RUN_ID).get("step", 0) >= at), 0.02, rng.uniform(0, 0.9 * span), \
            f"after step {at} is logged"
    if phase == "checkpoint":  # a small model's checkpoint is written in milliseconds: watch the folder closely
        at = rng.choice(range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY))
        return (lambda: (folder / f"step-{at:08d}").exists()), 0.001, rng.uniform(0, 0.005), \
            f"when checkpoint {at} appears on disk"
    if phase == "eval":
        at = rng.choice([EVAL_EVERY, STEPS])
        after = _window(ref, f"checkpoint {at}", f"eval {at}", 1.0)
        return (lambda: (store.latest_checkpoint(RUN_ID) or {}).get("step", 0) >= at), 0.02, \
            rng.uniform(0, 0.8 * after), f"after checkpoint {at} is registered"
    delay = rng.uniform(0, ref["duration_s"])
    return (lambda: time.monotonic() - t0 >= delay), 0.005, 0.0, f"{delay:.1f} s after the worker started"


def trial(index: int, phase: str, seed: int, ref: dict[str, Any], cwd: Path, lease: float = LEASE) -> dict[str, Any]:
    """Queue, start a worker, SIGKILL it at a moment aimed at ``phase``, finish with a second worker, check."""
    rng = random.Random(seed)
    cwd.mkdir(parents=True, exist_ok=True)
    queued = orch("queue", *SPEC, cwd=cwd)
    if queued.returncode != 0:
        raise SystemExit(f"orch queue failed: {queued.stderr.strip()}")
    store = open_store(cwd)
    t0 = time.monotonic()
    worker = start_worker(cwd, "--lease", str(lease))
    event, poll, extra, aim = kill_moment(phase, rng, ref, store, cwd, t0)
    reached = wait_for(lambda: event() or worker.poll() is not None, 3 * ref["duration_s"] + 120, poll)
    if reached and extra:
        time.sleep(extra)
    folders = on_disk(cwd)
    worker.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    worker.wait()
    run_dir = cwd / "runs" / str(RUN_ID)
    orphans_gone = wait_for(lambda: not training_processes(run_dir), 120, poll=0.2)
    orphan_wait = time.monotonic() - killed_at
    for proc in training_processes(run_dir):  # outlived their worker: a failure; end them before going on
        try:
            proc.kill()
        except Exception:  # noqa: BLE001 - gone in the meantime
            pass
    snap = {**snapshot(store, cwd), "on_disk": folders}  # what the killed attempt left, and what was on disk
    hit = phase_of(snap) if worker.returncode == -signal.SIGKILL else "worker had already exited"
    time.sleep(max(0.0, killed_at + lease + 1.0 - time.monotonic()))  # the dead worker's lease runs out
    finish = orch("worker", "--quiet", cwd=cwd)
    resumed = re.search(r"resuming from step (\d+)", finish.stdout)
    attempts = [a["outcome"] for a in store.attempts(RUN_ID)]
    names_steps = [(n, s) for n, s, _ in series(store)]
    final = comparable(store.final_metrics(RUN_ID))
    checks = {
        "finisher exit 0": finish.returncode == 0,
        "status finished": store.run(RUN_ID)["status"] == "finished",
        "attempts interrupted..., finished": bool(attempts) and attempts[-1] == "finished"
        and all(a == "interrupted" for a in attempts[:-1]),
        "no duplicate steps": len(names_steps) == len(set(names_steps)),
        "same (name, step) as reference": names_steps == [(n, s) for n, s, _ in ref["series"]],
        "final metrics bitwise equal": final == ref["final"],
    }
    result = {
        "trial": index, "seed": seed, "aimed": phase, "aim": aim,
        "kill_delay_s": killed_at - t0, "hit": hit, "log_last_step": snap["log_last_step"], "snapshot": snap,
        "orphans_gone": orphans_gone, "orphan_wait_s": orphan_wait,
        "resumed_from": int(resumed.group(1)) if resumed else None, "attempts": attempts,
        "checks": checks, "passed": all(checks.values()) and orphans_gone,
        "all_logged_values_equal": series(store) == ref["series"],
        "final_differences": {k: (final.get(k), ref["final"].get(k)) for k in set(final) | set(ref["final"])
                              if final.get(k) != ref["final"].get(k)},
        "dir": str(cwd),
    }
    if not result["passed"]:
        result["finisher_output"] = (finish.stdout + finish.stderr)[-2000:]
    store.engine.dispose()
    return result


def run_trials(trials: int, seed: int, base: Path, lease: float = LEASE, phases: list[str] | None = None,
               echo: Callable[[str], None] = print) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The reference run, then ``trials`` kills aimed at ``phases`` in turn (default: all of PHASES)."""
    phases = phases or PHASES
    echo("reference run (uninterrupted) ...")
    ref = reference(base / "reference")
    echo(f"reference: {ref['duration_s']:.1f} s; timeline " +
         ", ".join(f"{k} {v:.1f}" for k, v in ref["timeline"].items()))
    rng = random.Random(seed)
    results = []
    for i in range(trials):
        phase = phases[i % len(phases)]
        r = trial(i + 1, phase, rng.randrange(2**31), ref, base / f"trial-{i + 1:02d}", lease)
        results.append(r)
        echo(f"trial {i + 1}: aimed {phase} ({r['aim']}), killed at {r['kill_delay_s']:.1f} s: {r['hit']}; "
             f"resumed from {r['resumed_from']}; {'pass' if r['passed'] else 'FAIL'}")
    return ref, results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/kill.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="number of kills (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments (default 0)")
    parser.add_argument("--lease", type=float, default=LEASE, help=f"lease of the killed worker (default {LEASE})")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the trial folders go (default: a new temp folder, removed unless a trial fails "
                             "or --keep)")
    parser.add_argument("--phases", type=lambda t: [x.strip() for x in t.split(",") if x.strip()], default=PHASES,
                        help=f"kill moments aimed at these phases, in turn (default {','.join(PHASES)})")
    parser.add_argument("--keep", action="store_true", help="keep the trial folders")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    info = header("bench/kill.py: SIGKILL a worker at random moments; the run must end as if uninterrupted")
    base = args.workdir or Path(tempfile.mkdtemp(prefix="orch-bench-kill-"))
    base.mkdir(parents=True, exist_ok=True)
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(sorted(unknown))}: choose from {', '.join(PHASES)}")
    ref, results = run_trials(args.trials, args.seed, base, args.lease, args.phases,
                              echo=lambda s: print(s, flush=True))
    passed = sum(r["passed"] for r in results)
    print()
    print(table(["trial", "aimed at", "kill delay s", "phase hit", "last step line in its log", "resumed from",
                 "attempts", "all values equal", "result"],
                [[r["trial"], r["aimed"], r["kill_delay_s"], r["hit"], r["log_last_step"][:40] or "-",
                  "-" if r["resumed_from"] is None else r["resumed_from"], ",".join(r["attempts"]),
                  "yes" if r["all_logged_values_equal"] else "no",
                  "pass" if r["passed"] else "FAIL: " + ", ".join(k for k, v in r["checks"].items() if not v)]
                 for r in results]))
    core = sum(all(r["checks"][k] for k in CORE_CHECKS) and r["orphans_gone"] for r in results)
    print(f"\n{passed}/{len(results)} passed every check; {core}/{len(results)} passed the three core checks "
          f"(finished exactly once, no duplicate steps, final metrics bitwise equal); "
          f"{sum(r['all_logged_values_equal'] for r in results)}/{len(results)} with every logged value equal too "
          f"(reference run {ref['duration_s']:.1f} s)")
    for r in results:
        if not r["passed"]:
            print(f"trial {r['trial']} failed ({r['dir']}): {r['final_differences'] or ''}\n"
                  f"{r.get('finisher_output', '')}")
    write_json(args.json, {**info, "reference": {k: v for k, v in ref.items() if k != "series"},
                           "trials": results, "passed": passed, "passed_core_checks": core,
                           "total": len(results)})
    if passed == len(results) and not args.keep and args.workdir is None:
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"trial folders kept in {base}")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
