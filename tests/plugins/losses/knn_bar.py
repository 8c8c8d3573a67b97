"""The catalog issue's bar for image-image losses: the default short run (vit, shipped MNIST, 500 steps of
128) lifts kNN top-1 on the held-out split at least 10 points above the same encoder at initialisation."""

from __future__ import annotations

from pathlib import Path

from orchestrator.store import Store
from orchestrator.testing import metrics_at_init, run_orch


def assert_default_run_beats_init_by_10_points(workdir: Path, loss: str) -> None:
    flags = {"encoder": "vit", "loss": loss, "eval": "knn"}
    result = run_orch("run", *[x for k, v in flags.items() for x in (f"--{k}", v)], "--quiet", cwd=workdir,
                      timeout=1500)
    assert result.returncode == 0, result.stdout + result.stderr
    trained = Store.open(f"sqlite:///{workdir}/experiments.db").final_metrics(1)["knn/top1"]
    initial = metrics_at_init(**flags)["knn/top1"]
    assert trained >= initial + 10, f"kNN top-1 {trained:.1f} after the run, {initial:.1f} at initialisation"
