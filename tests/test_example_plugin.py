"""The example third-party package (examples/orch-plugin-example), pip-installed: its own tests pass, and
its dataset, encoder, loss, sampler, evaluator and tracker train together in `orch run`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import orch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "orch-plugin-example"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of the example (so no build files land in the repository), pip-installed with --target."""
    root = tmp_path_factory.mktemp("example")
    source = root / "orch-plugin-example"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__",
                                                                   ".pytest_cache"))
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), str(source)], check=True, capture_output=True)
    return source, site


@pytest.mark.slow
def test_the_example_passes_its_own_tests_when_installed(installed: tuple[Path, Path]) -> None:
    source, site = installed
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(source)],
                            cwd=source.parent, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": f"{site}:{ROOT}"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout and "failed" not in result.stdout


@pytest.mark.slow
def test_every_example_component_trains_together(installed: tuple[Path, Path], workdir: Path) -> None:
    _, site = installed
    events = workdir / "events.jsonl"
    env = {"PYTHONPATH": f"{site}:{ROOT}", "ORCH_EXAMPLE_EVENTS": str(events), "ORCH_DISABLE_PLUGINS": "mlflow"}
    result = orch("run", "--data", "example-shapes:per_class=40", "--encoder", "example-mlp:hidden=64",
                  "--loss", "vse-hinge:margin=0.1", "--sampler", "example-stratified", "--eval", "example-centroid",
                  "--steps", "4", "--batch-size", "32", "--quiet", cwd=workdir, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    shown = json.loads(orch("show", "1", "--json", cwd=workdir, env=env).stdout)
    assert shown["status"] == "finished"
    for slot in ("data", "encoder", "loss", "sampler"):
        assert shown["spec"][slot]["plugin"] == {"distribution": "orch-plugin-example", "version": "0.1.0"}, slot
    assert shown["spec"]["data"]["options"]["per_class"] == 40 and shown["spec"]["loss"]["options"]["margin"] == 0.1
    assert 0 <= shown["metrics"]["example-centroid/top1"] <= 100
    assert "train/loss" in shown["metrics"]

    seen = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "run_started" and seen[0]["resumed_from"] is None
    assert "metrics_logged" in kinds and "checkpoint_saved" in kinds
    assert kinds[-1] == "run_ended" and seen[-1]["status"] == "finished"
    assert {e["run"] for e in seen} == {1}
