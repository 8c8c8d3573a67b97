"""A worker evaluates a run on an ImageNet validation folder in ImageFolder layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from orchestrator.store import Store
from tests.conftest import orch

pytestmark = pytest.mark.slow
META = Path(__file__).resolve().parents[2] / "plugins" / "evaluators" / "imagenet_zeroshot.json"


def test_worker_evaluates_imagenet_zero_shot_on_a_folder(workdir: Path) -> None:
    wnids = json.loads(META.read_text())["wnids"][:3]
    root = workdir / "imagenet" / "val"
    generator = torch.Generator().manual_seed(0)
    for wnid in wnids:
        (root / wnid).mkdir(parents=True)
        for i in range(3):
            pixels = (torch.rand(40, 48, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / wnid / f"ILSVRC2012_val_{i}.JPEG")
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
