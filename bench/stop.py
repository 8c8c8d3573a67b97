"""A worker told to stop (SIGTERM): how long it takes to exit, and how much training the run keeps.

Per setting of ``orch worker --checkpoint-on-stop`` (20 s, the default, and 0: stop the ranks at once), in a
fresh working directory: queue a small run that checkpoints every 100 steps, start ``orch worker --quiet``,
send it SIGTERM once the store shows logged step 150, and measure the time until it exits and the step the
run resumes from. With the stop checkpoint the run resumes from the log step after the signal; without it,
from its last periodic checkpoint (step 100): the steps between are trained again.

    python bench/stop.py
    python bench/stop.py --repeats 3 --json /tmp/stop.json
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from bench._common import header, median, orch_command, table, write_json  # noqa: E402
from bench.kill import env  # noqa: E402

SPEC = ["--encoder", "vit:depth=1,width=64,embed_dim=64", "--text-encoder",
        "text-transformer:depth=1,width=64,embed_dim=64", "--batch-size", "64",
        "--steps", "2000", "--checkpoint-every", "100", "--log-every", "10"]
SIGNAL_AT = 150


def trial(grace: float) -> dict[str, Any]:
    from orchestrator.store import Store

    with tempfile.TemporaryDirectory(prefix="orch-stop-") as folder:
        subprocess.run([*orch_command(), "queue", *SPEC], cwd=folder, env=env(), check=True, capture_output=True)
        store = Store.open(f"sqlite:///{folder}/experiments.db")
        worker = subprocess.Popen([*orch_command(), "worker", "--quiet", "--checkpoint-on-stop", str(grace)],
                                  cwd=folder, env=env(), stdout=subprocess.PIPE, text=True)
        while (logged := store.progress(1).get("step", 0)) < SIGNAL_AT:
            if worker.poll() is not None:
                raise SystemExit(f"the worker exited with code {worker.returncode} before step {SIGNAL_AT}")
            time.sleep(0.1)
        start = time.perf_counter()
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=300)
        seconds = time.perf_counter() - start
        checkpoint = store.latest_checkpoint(1)
        resumes = checkpoint["step"] if checkpoint else 0
        return {"checkpoint_on_stop": grace, "signalled_at_step": logged, "exit_seconds": seconds,
                "exit_code": worker.returncode, "resumes_from": resumes,
                "steps_trained_again": max(0, logged - resumes), "status": store.run(1)["status"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/stop.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="trials per setting (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    info = header("bench/stop.py: SIGTERM to a worker, with and without the stop checkpoint")
    trials = [trial(grace) for grace in (20.0, 0.0) for _ in range(args.repeats)]
    print(table(["--checkpoint-on-stop s", "signalled at step", "worker exit s", "exit code", "resumes from step",
                 "steps trained again (at least)", "run"],
                [[t["checkpoint_on_stop"], t["signalled_at_step"], t["exit_seconds"], t["exit_code"],
                  t["resumes_from"], t["steps_trained_again"], t["status"]] for t in trials]))
    summary = {grace: median([t["exit_seconds"] for t in trials if t["checkpoint_on_stop"] == grace])
               for grace in (20.0, 0.0)}
    print(f"\nmedian exit: {summary[20.0]:.2f} s with the stop checkpoint, {summary[0.0]:.2f} s without")
    write_json(args.json, {**info, "trials": trials, "median_exit_seconds": summary})
    bad = [t for t in trials if t["status"] != "queued" or t["exit_code"] != 128 + signal.SIGTERM]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
