"""linear-probe: CLIP's logistic-regression probe, with the C search, on features whose answer is known."""

import pytest
import torch
from probe_data import PixelIdImage, marked_mnist, synthetic

from orchestrator.engine.evaluation import EvalContext
from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.testing import assert_light, check, check_evaluator, eval_context
from plugins.evaluators.linear_probe import LinearProbe, binary_search_log_c


def context(dataset, classes) -> EvalContext:
    return EvalContext(PixelIdImage(classes), None, dataset, torch.device("cpu"), batch_size=1000)


def test_separating_features_on_mnist_score_100():
    data = marked_mnist()
    probe = LinearProbe(refinements=1)
    assert probe.evaluate(context(data, 10)) == {"top1": 100.0, "top5": 100.0}
    protocol = probe.protocol()
    assert protocol["train_samples"] == 3200 and protocol["val_samples"] == 800 and protocol["test_samples"] == 1000
    assert len(protocol["grid"]) == 9 and 1e-6 <= protocol["C"] <= 1e6  # 7 coarse values + 2 refinements
    assert protocol["refit"] == "train + val" and protocol["max_iter"] == 1000


def test_shuffled_labels_score_chance():
    data = synthetic(classes=10, train_per_class=40, test_per_class=40, shuffle=True)
    metrics = LinearProbe(refinements=0).evaluate(context(data, 10))
    assert 2.0 < metrics["top1"] < 20.0  # chance is 10%
    assert 30.0 < metrics["top5"] < 70.0  # chance is 50%


def test_binary_search_halves_around_the_peak():
    def score(C):  # peaks at C = 10^1.25
        return -abs(torch.log10(torch.tensor(C, dtype=torch.float64)).item() - 1.25)

    best, tried = binary_search_log_c(score, refinements=3)
    assert best == 1.25
    # the coarse grid, then around 2: 1 and 3; around 1: 0.5 and 1.5; around 1 (tie with 1.5): 0.75 and 1.25
    assert list(tried) == [-6.0, -4.0, -2.0, 0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_plateau_takes_the_middle():
    best, tried = binary_search_log_c(lambda C: 1.0, refinements=0)
    assert best == 0.0 and list(tried) == [-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0]


def test_contract_registration_and_bad_options():
    assert set(check_evaluator(LinearProbe(refinements=0), eval_context(text=False))) == {"top1"}
    assert_light("plugins.evaluators")
    registry = Registry.load()
    component = registry.get("evaluator", "linear-probe")
    assert component.declared == {"needs": {"label"}}
    assert isinstance(check("evaluator", "linear-probe", registry, refinements=0), LinearProbe)
    with pytest.raises(UserError, match="val_fraction"):
        LinearProbe(val_fraction=1.0)
