"""few-shot: n-shot logistic-regression probes, mean and std over draws, on features whose answer is known."""

import numpy as np
import pytest
import torch
from probe_data import PixelIdImage, synthetic

from orchestrator.engine.evaluation import EvalContext
from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.testing import assert_light, check, check_evaluator, eval_context
from plugins.evaluators.few_shot import FewShot, draw_shots


def context(dataset, classes) -> EvalContext:
    return EvalContext(PixelIdImage(classes), None, dataset, torch.device("cpu"))


def test_separating_features_score_100_at_every_shot():
    evaluator = FewShot(shots=(1, 4), seeds=2)
    metrics = evaluator.evaluate(context(synthetic(classes=10), 10))
    assert metrics == {"top1_1shot": 100.0, "top1_1shot_std": 0.0, "top1_4shot": 100.0, "top1_4shot_std": 0.0}
    protocol = evaluator.protocol()
    assert protocol["shots"] == [1, 4] and protocol["seeds"] == 2 and protocol["C"] == 1.0
    assert protocol["train_pool"] == 200 and protocol["test_samples"] == 100 and protocol["classes"] == 10


def test_shuffled_labels_score_chance():
    data = synthetic(classes=10, train_per_class=40, test_per_class=40, shuffle=True)
    metrics = FewShot(shots=(16,), seeds=3).evaluate(context(data, 10))
    assert 2.0 < metrics["top1_16shot"] < 20.0  # chance is 10%
    assert metrics["top1_16shot_std"] > 0.0  # different draws, different probes


def test_draws_are_per_class_seeded_and_capped():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 6)
    picked = draw_shots(labels, 4, seed=0)
    assert np.bincount(labels[picked]).tolist() == [4, 3, 4]  # class 1 has only 3
    assert len(set(picked.tolist())) == len(picked)
    assert (picked == draw_shots(labels, 4, seed=0)).all()
    assert not (picked == draw_shots(labels, 4, seed=1)).all()


def test_contract_registration_and_bad_options():
    results = check_evaluator(FewShot(shots=(1, 2), seeds=2), eval_context(text=False))
    assert set(results) == {"top1_1shot", "top1_1shot_std", "top1_2shot", "top1_2shot_std"}
    assert_light("plugins.evaluators")
    registry = Registry.load()
    component = registry.get("evaluator", "few-shot")
    assert component.declared == {"needs": {"label"}}
    assert [(o.name, o.default) for o in component.options][:2] == [("shots", (1, 2, 4, 8, 16)), ("seeds", 3)]
    assert check("evaluator", "few-shot", registry, shots=(1, 2), seeds=1).shots == (1, 2)
    with pytest.raises(UserError, match="shots"):
        FewShot(shots=(0,))
