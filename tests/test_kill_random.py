"""A worker SIGKILLed at seeded random moments: the CI-sized version of bench/kill.py (2 trials).

The kills are aimed at the two riskiest phases, mid-checkpoint-write and mid-evaluation; each run must
resume, finish exactly once (attempts interrupted, finished), log no step twice, log the same (name, step)
pairs and end with final metrics bitwise equal to an uninterrupted run's. ``python bench/kill.py`` runs 20
trials over all phases. With this seed the kills aim at checkpoint 10 and the final evaluation; a kill in
the evaluation at step 20 (after checkpoint 20 is registered) currently loses that evaluation's metrics on
resume, which bench/kill.py reports.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.slow

BENCH_KILL = Path(__file__).resolve().parent.parent / "bench" / "kill.py"


def _bench_kill() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_kill", BENCH_KILL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worker_killed_at_random_moments_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    kill = _bench_kill()
    ref, results = kill.run_trials(2, seed=20261122, base=tmp_path, phases=["checkpoint", "eval"],
                                   echo=lambda _: None)
    assert "zs/top1" in ref["final"]
    for r in results:
        failed = [name for name, ok in r["checks"].items() if not ok]
        assert r["orphans_gone"], f"trial {r['trial']}: the killed worker's training processes outlived it"
        assert not failed, (f"trial {r['trial']} (killed {r['kill_delay_s']:.1f} s in, {r['hit']}): {failed}; "
                            f"differences {r['final_differences']}; {r.get('finisher_output', '')}")
        assert r["attempts"][-1] == "finished"
