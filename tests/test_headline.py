"""The main command on the embedded defaults: CLIP on the shipped MNIST digits, tracked in MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.store import Store
from tests.conftest import orch

pytestmark = pytest.mark.slow


def test_default_clip_run_reaches_90_percent_zero_shot(workdir: Path) -> None:
    result = orch("run", "--encoder", "vit", "--loss", "infonce", "--eval", "zs", "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    store = Store.open(f"sqlite:///{workdir}/experiments.db")  # the default store, in the working directory
    run = store.run(1)
    metrics = store.final_metrics(1)
    assert run["status"] == "finished"
    assert metrics["zs/top1"] >= 90.0, metrics

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    (tracked,) = client.search_runs([client.get_experiment_by_name("orch").experiment_id])
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == run["name"]
    assert tracked.data.metrics["zs/top1"] == pytest.approx(metrics["zs/top1"])
    assert tracked.data.params["encoder.name"] == "vit" and tracked.data.tags["orch.spec_hash"] == run["spec_hash"]
    steps = [m.step for m in client.get_metric_history(tracked.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == run["spec"]["trainer"]["steps"]
    artifacts = {a.path for a in client.list_artifacts(tracked.info.run_id)}
    assert "spec.json" in artifacts
