"""CLI start-up: wall time of everyday ``orch`` commands in a fresh interpreter, and what they import.

A scratch working directory gets a store of ~100 queued runs (``orch queue --seed 0 ... --seed 99``),
each then given an attempt and a metric history through the Store API, so ``orch ls`` has results to
show. Each command runs N times in a new process (``subprocess``, the installed ``orch`` script);
reported: median and min wall time against the target (<= 0.3 s), next to the interpreter's own start
(``python -c pass``) and ``python -c "import orchestrator.cli"``. Then ``python -X importtime`` lists the
imports that cost most, for ``import orchestrator.cli`` and for each command, and says whether a command
imported torch, deepspeed or mlflow (the design forbids it for --help, ls, show and plugins).

    python bench/cli.py                      # N=10, 100 runs
    python bench/cli.py --repeat 3 --runs 20 --json /tmp/cli.json
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from bench._common import header, median, orch_command, table, write_json  # noqa: E402

HEAVY = ("torch", "deepspeed", "mlflow", "numpy", "transformers", "torchvision", "alembic", "pandas", "sklearn",
         "matplotlib")
CLEAN_ENV = ("ORCH_STORE", "ORCH_RUNS_DIR", "MLFLOW_TRACKING_URI", "ORCH_DISABLE_PLUGINS")


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}


def populate(cwd: Path, runs: int, steps: int) -> None:
    """``runs`` queued runs, each with one finished attempt and ``steps`` logged steps of 4 scalars."""
    seeds = [x for s in range(runs) for x in ("--seed", str(s))]
    queued = subprocess.run([*orch_command(), "queue", "--steps", str(10 * steps), *seeds], cwd=cwd, env=_env(),
                            capture_output=True, text=True, timeout=600)
    if queued.returncode != 0:
        raise SystemExit(f"orch queue failed: {queued.stderr.strip()}")
    from orchestrator.store import Store

    store = Store.open(f"sqlite:///{cwd}/experiments.db")
    while (claim := store.claim("bench", 60)) is not None:
        rows = [(s * 10, name, 1.0 / (s + 1)) for s in range(1, steps + 1)
                for name in ("train/loss", "train/lr", "train/logit_scale", "train/samples_per_s")]
        rows += [(steps * 10, "zs/top1", 0.5), (steps * 10, "zs/top5", 0.9)]
        store.log_metrics(claim, rows)
        store.end_attempt(claim, "finished")
    store.engine.dispose()


def time_command(argv: list[str], cwd: Path, repeat: int) -> dict[str, Any]:
    times, code, err = [], 0, ""
    for _ in range(repeat):
        began = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
        times.append(time.perf_counter() - began)
        code, err = done.returncode, done.stderr.strip()
    return {"times_s": times, "median_s": median(times), "min_s": min(times), "exit_code": code,
            "stderr": err[-300:]}


def importtime(args: list[str], cwd: Path, repeat: int) -> list[dict[str, Any]]:
    """``python -X importtime`` rows (module, self and cumulative seconds, nesting depth), each the
    minimum over ``repeat`` runs: one run on a busy machine is noisy."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for _ in range(repeat):
        done = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=cwd, env=_env(), capture_output=True,
                              text=True, timeout=300)
        for line in done.stderr.splitlines():
            if not line.startswith("import time:") or "cumulative" in line:
                continue
            parts = line[len("import time:"):].split("|")
            self_us, cum_us, name = int(parts[0]), int(parts[1]), parts[2]
            key = (name.strip(), (len(name) - len(name.lstrip(" "))) // 2)
            row = {"module": key[0], "self_s": self_us / 1e6, "cumulative_s": cum_us / 1e6, "depth": key[1]}
            if key not in best or row["cumulative_s"] < best[key]["cumulative_s"]:
                best[key] = row
    return list(best.values())


def summarise_imports(rows: list[dict[str, Any]], top: int) -> dict[str, Any]:
    roots = sorted((r for r in rows if r["depth"] == 0), key=lambda r: -r["cumulative_s"])
    heavy = sorted({r["module"].split(".")[0] for r in rows if r["module"].split(".")[0] in HEAVY})
    return {"total_s": sum(r["cumulative_s"] for r in roots), "modules": len(rows),
            "top_level": [(r["module"], r["cumulative_s"]) for r in roots[:top]],
            "top_any": [(r["module"], r["cumulative_s"], r["depth"])
                        for r in sorted(rows, key=lambda r: -r["cumulative_s"])[:top]],
            "heavy": heavy}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/cli.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=10, help="runs of each command (default 10)")
    parser.add_argument("--runs", type=int, default=100, help="runs in the scratch store (default 100)")
    parser.add_argument("--steps", type=int, default=50, help="logged steps per run in the store (default 50)")
    parser.add_argument("--target", type=float, default=0.3, help="target wall time in seconds (default 0.3)")
    parser.add_argument("--top", type=int, default=12, help="imports listed per profile (default 12)")
    parser.add_argument("--profile-repeat", type=int, default=3,
                        help="importtime runs per profile; the minimum per module is kept (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    info = header("bench/cli.py: orch command start-up time")
    orch = orch_command()
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "python -c 'import orchestrator.cli'": [sys.executable, "-c", "import orchestrator.cli"],
        "orch --help": [*orch, "--help"],
        "orch ls": [*orch, "ls"],
        "orch show 1": [*orch, "show", "1"],
        "orch plugins": [*orch, "plugins"],
        "orch queue": None,  # a new seed each time: every call queues a run
    }
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="orch-bench-cli-") as tmp:
        cwd = Path(tmp)
        populate(cwd, args.runs, args.steps)
        print(f"store: {args.runs} runs with {args.steps} logged steps each; orch = {shlex.join(orch)}\n", flush=True)
        for label, argv_ in commands.items():
            if argv_ is None:
                times = []
                for i in range(args.repeat):
                    r = time_command([*orch, "queue", "--seed", str(100000 + i)], cwd, 1)
                    times.append(r["times_s"][0])
                results[label] = {**r, "times_s": times, "median_s": median(times), "min_s": min(times)}
            else:
                results[label] = time_command(argv_, cwd, args.repeat)
            print(f"{label}: median {results[label]['median_s']:.3f} s", flush=True)
        profiles = {"import orchestrator.cli": importtime(["-c", "import orchestrator.cli"], cwd, args.profile_repeat)}
        for label in ("orch --help", "orch ls", "orch show 1", "orch plugins", "orch queue"):
            extra = label.split()[1:] if label != "orch queue" else ["queue", "--seed", "200000"]
            profiles[label] = importtime(["-m", "orchestrator.cli", *extra], cwd, args.profile_repeat)
    summaries = {k: summarise_imports(v, args.top) for k, v in profiles.items()}

    print()
    rows = []
    for label, r in results.items():
        is_orch = label.startswith("orch")
        verdict = ("ok" if r["median_s"] <= args.target else "OVER") if is_orch else "-"
        profile = summaries.get(label if is_orch else "import orchestrator.cli" if "import" in label else "")
        rows.append([label, r["median_s"], r["min_s"], args.target if is_orch else "-", verdict,
                     profile["total_s"] if profile else "-", r["exit_code"]])
    print(table(["command", "median s", "min s", "target s", "median vs target", "of which imports s", "exit"],
                rows))
    print()
    print(table(["profile (python -X importtime)", "import total s", "modules", "heavy packages imported",
                 "top top-level imports (cumulative s)"],
                [[k, s["total_s"], s["modules"], ", ".join(s["heavy"]) or "none",
                  "; ".join(f"{m} {t:.3f}" for m, t in s["top_level"][:5])] for k, s in summaries.items()]))
    s = summaries["import orchestrator.cli"]
    print("\nimport orchestrator.cli: top imports by cumulative time (depth = import nesting):")
    print(table(["module", "cumulative s", "depth"], [[m, t, d] for m, t, d in s["top_any"]]))
    for label in ("orch ls", "orch queue"):
        print(f"\n{label}: top imports by cumulative time:")
        print(table(["module", "cumulative s", "depth"], summaries[label]["top_any"]))
    for label, r in results.items():
        if r["exit_code"] != 0:
            print(f"\n{label} exited {r['exit_code']}: {r['stderr']}")
    write_json(args.json, {**info, "results": results, "imports": summaries, "target_s": args.target})
    return 0


if __name__ == "__main__":
    sys.exit(main())
