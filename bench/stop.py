"""A worker told to stop (SIGTERM): how long it takes to exit, and how much training the run keeps.

Five settings: SIGTERM to the worker with ``orch worker --checkpoint-on-stop`` 20 (the default), the same
signal to every process of the run at once (the worker, its ranks and their loader workers: systemd's default
KillMode, a plain ``scancel``), SIGTERM to the worker with ``--checkpoint-on-stop 0`` (stop the ranks at
once), SIGTERM to the worker of a run that logs every 100 steps and checkpoints every 500 (a sparse cadence,
as large runs use), and SIGTERM to the worker while the run evaluates imagenet-zs at step 200 (1000 classes x
80 prompts on a folder of 9 images made here). Each in a fresh working directory: queue a small 2-rank run (by
default it logs every 10 steps and checkpoints every 100), start ``orch worker --quiet``, send the signal once
the store shows logged step 150 (step 100 for the sparse setting; once rank 0 logs that it evaluates step 200
for the last), and measure the time until the worker exits, the step the run resumes from, the steps trained
after the signal and the steps that will be trained again. With the stop checkpoint the run resumes from where
the ranks agreed to stop; without it, from its last periodic checkpoint (step 100): the steps between are
trained again.

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

import psutil  # noqa: E402

from bench._common import header, int_list, median, orch_command, table, write_json  # noqa: E402
from bench.kill import env  # noqa: E402

SPEC = ["--encoder", "vit:depth=1,width=64,embed_dim=64", "--text-encoder",
        "text-transformer:depth=1,width=64,embed_dim=64", "--batch-size", "64",
        "--steps", "2000", "--gpus", "2", "--workers", "1"]
DENSE, SPARSE = (10, 100), (100, 500)  # (--log-every, --checkpoint-every)
# (who gets SIGTERM, --checkpoint-on-stop, cadence, signal once this step is logged, or evaluated)
SETTINGS = [("worker", 20.0, DENSE, 150, False), ("every process", 20.0, DENSE, 150, False),
            ("worker", 0.0, DENSE, 150, False), ("worker", 20.0, SPARSE, 100, False),
            ("worker", 20.0, DENSE, 200, True)]


def trial(target: str, grace: float, cadence: tuple[int, int], signal_at: int, evaluating: bool) -> dict[str, Any]:
    from orchestrator.store import Store
    from orchestrator.testing import image_folder
    from plugins.evaluators import imagenet_metadata

    log_every, checkpoint_every = cadence
    spec = [*SPEC, "--log-every", str(log_every), "--checkpoint-every", str(checkpoint_every)]
    with tempfile.TemporaryDirectory(prefix="orch-stop-") as folder:
        log = Path(folder, "runs", "1", "attempt-1.log")
        if evaluating:
            root = image_folder(Path(folder, "val"), imagenet_metadata()["wnids"][:3])
            spec += ["--eval", f"imagenet-zs:root={root},workers=0", "--eval-every", str(signal_at)]

        def reached() -> bool:
            if evaluating:
                return log.exists() and f"orch: evaluating step {signal_at}:" in log.read_text()
            return store.progress(1).get("step", 0) >= signal_at

        subprocess.run([*orch_command(), "queue", *spec], cwd=folder, env=env(), check=True, capture_output=True)
        store = Store.open(f"sqlite:///{folder}/experiments.db")
        worker = subprocess.Popen([*orch_command(), "worker", "--quiet", "--checkpoint-on-stop", str(grace)],
                                  cwd=folder, env=env(), stdout=subprocess.PIPE, text=True)
        while not reached():
            if worker.poll() is not None:
                raise SystemExit(f"the worker exited with code {worker.returncode} before step {signal_at}")
            time.sleep(0.1)
        logged = signal_at if evaluating else store.progress(1).get("step", 0)
        processes = [psutil.Process(worker.pid)]
        if target == "every process":
            processes += processes[0].children(recursive=True)
        start = time.perf_counter()
        for process in processes:
            process.send_signal(signal.SIGTERM)
        worker.communicate(timeout=300)
        seconds = time.perf_counter() - start
        checkpoint = store.latest_checkpoint(1)
        resumes = checkpoint["step"] if checkpoint else 0
        return {"signalled": target + (f" evaluating step {signal_at}" if evaluating else ""),
                "checkpoint_on_stop": grace, "log_every": log_every,
                "checkpoint_every": checkpoint_every, "signalled_at_step": logged, "exit_seconds": seconds,
                "exit_code": worker.returncode, "resumes_from": resumes,
                "steps_past_the_signal": max(0, resumes - logged),
                "steps_trained_again": max(0, logged - resumes), "status": store.run(1)["status"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/stop.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1, help="trials per setting (default 1)")
    parser.add_argument("--settings", type=int_list, default=list(range(1, len(SETTINGS) + 1)), metavar="N,...",
                        help="which settings, numbered from 1 in the order above (default all)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    info = header("bench/stop.py: SIGTERM to a worker, with and without the stop checkpoint")
    trials = [{"setting": i, **trial(*SETTINGS[i - 1])} for i in args.settings for _ in range(args.repeats)]
    print(table(["SIGTERM to", "--checkpoint-on-stop s", "log / checkpoint every", "signalled at step",
                 "worker exit s", "exit code", "resumes from step", "steps past the signal (at most)",
                 "steps trained again (at least)", "run"],
                [[t["signalled"], t["checkpoint_on_stop"], f"{t['log_every']} / {t['checkpoint_every']}",
                  t["signalled_at_step"], t["exit_seconds"], t["exit_code"], t["resumes_from"],
                  t["steps_past_the_signal"], t["steps_trained_again"], t["status"]] for t in trials]))
    summary = {}
    for i in args.settings:
        ran = [t for t in trials if t["setting"] == i]
        name = f"{ran[0]['signalled']}, {ran[0]['checkpoint_on_stop']:g} s, log every {ran[0]['log_every']}"
        summary[name] = median([t["exit_seconds"] for t in ran])
    print("\nmedian worker exit: " + "; ".join(f"{k}: {v:.2f} s" for k, v in summary.items()))
    write_json(args.json, {**info, "trials": trials, "median_exit_seconds": summary})
    bad = [t for t in trials if t["status"] != "queued" or t["exit_code"] != 128 + signal.SIGTERM]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
