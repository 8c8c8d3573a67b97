"""The example plugin's own tests, on orch's helpers for plugin authors (orchestrator.testing).

Run from this folder: ``pip install -e . && pytest``. The tests marked ``needs_install`` need the package
installed (its entry point is what `orch` finds); the others load the registration module directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import orch_plugin_example
import pytest
import torch

from orchestrator.testing import (
    assert_light,
    build,
    check,
    check_loss_distributed,
    check_tracker,
    eval_context,
    installed,
    plugin_registry,
    run_orch,
)

needs_install = pytest.mark.skipif(not installed("orch-plugin-example"), reason="pip install -e . first")
COMPONENTS = [("dataset", "example-shapes"), ("encoder", "example-mlp"), ("loss", "vse-hinge"),
              ("sampler", "example-stratified"), ("evaluator", "example-centroid")]


@pytest.fixture(scope="module")
def registry():
    return plugin_registry(orch_plugin_example)


@pytest.mark.parametrize("kind, name", COMPONENTS)
def test_each_component_meets_its_contract(registry, kind: str, name: str) -> None:
    check(kind, name, registry)


def test_the_tracker_writes_one_json_line_per_event(registry, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ORCH_EXAMPLE_EVENTS", str(tmp_path / "events.jsonl"))
    check("tracker", "orch_plugin_example", registry)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["run_started", "metrics_logged", "checkpoint_saved", "run_ended"]
    monkeypatch.delenv("ORCH_EXAMPLE_EVENTS")
    check_tracker(orch_plugin_example)  # without the variable: nothing, and no error


def test_options_are_read_from_source_without_torch() -> None:
    assert_light("orch_plugin_example")


def test_shapes_are_seeded_and_the_held_out_split_is_fixed(registry) -> None:
    a, b = build("dataset", "example-shapes", registry), build("dataset", "example-shapes", registry, seed=0)
    assert torch.equal(a.test.images, b.test.images) and a.test.labels == b.test.labels
    other = build("dataset", "example-shapes", registry, seed=1)
    assert not torch.equal(a.test.images, other.test.images) and a.test.labels == other.test.labels
    assert len(a.test) == 4 * 16 and a.class_names == ["circle", "square", "triangle", "cross"]


def test_stratified_batches_mix_the_classes_equally(registry) -> None:
    sampler = build("sampler", "example-stratified", registry)
    labels = [i % 4 for i in range(64)]
    for batch in sampler.batches(64, labels, 16, seed=3, epoch=0):
        assert sorted(labels[i] for i in batch) == sorted(list(range(4)) * 4)
    assert sampler.batches(64, labels, 16, 3, 0) != sampler.batches(64, labels, 16, 3, 1)


class Brightness(torch.nn.Module):
    """Features (mean brightness, 1): on the tiny dataset of eval_context, class k is brighter with k."""

    embed_dim = 2

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        mean = images.mean(dim=(1, 2, 3))
        return torch.stack([mean, torch.ones_like(mean)], dim=1)


def test_centroid_evaluator_is_perfect_on_separable_features(registry) -> None:
    ctx = eval_context(text=False, image_encoder=Brightness())
    assert build("evaluator", "example-centroid", registry).evaluate(ctx) == {"top1": 100.0}


def test_the_hinge_loss_is_exact_across_two_ranks() -> None:
    check_loss_distributed("vse-hinge", "orch_plugin_example", margin=0.3)


@needs_install
def test_orch_lists_every_component_of_the_installed_package(orch_workdir: Path) -> None:
    result = run_orch("plugins", "--json", cwd=orch_workdir)
    listed = {(i["kind"], i["name"]): i for i in json.loads(result.stdout)}
    for key in [*COMPONENTS, ("tracker", "example")]:
        assert listed[key]["status"] == "ok" and listed[key]["distribution"] == "orch-plugin-example", key
    assert plugin_registry(distribution="orch-plugin-example").get("encoder", "example-mlp")
