"""A worker evaluates a run on an ImageNet validation folder in ImageFolder layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.store import Store
from tests.conftest import imagenet_folder, orch

pytestmark = pytest.mark.slow


def test_worker_evaluates_imagenet_zero_shot_on_a_folder(workdir: Path) -> None:
    root = imagenet_folder(workdir / "imagenet" / "val")
    queued = orch("queue", "--eval", f"imagenet-zs:root={root},classes=present", "--steps", "3", "--batch-size", "32",
                  cwd=workdir)
    assert queued.returncode == 0, queued.stderr
    assert orch("worker", "--quiet", cwd=workdir).returncode == 0
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    assert store.run(1)["status"] == "finished"
    metrics = store.final_metrics(1)
    assert 0.0 <= metrics["imagenet-zs/top1"] <= 100.0
    report = json.loads((workdir / "runs" / "1" / "final" / "eval.json").read_text())
    assert "imagenet-zs/top1" in report["metrics"]
