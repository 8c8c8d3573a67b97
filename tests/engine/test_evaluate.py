"""Evaluating in the middle of a run must not move any global RNG the training steps draw from: an evaluator
from a plugin may shuffle with Python's `random` or numpy, and a loss or augmentation may draw from either."""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from orchestrator.engine.evaluation import EvalContext
from orchestrator.engine.train import _evaluate


class DrawsFromEveryRng:
    """An evaluator that consumes Python's, numpy's and torch's global generators, as a careless plugin might."""

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        return {"draws": random.random() + float(np.random.rand()) + float(torch.rand(()))}


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_evaluating_leaves_every_global_rng_where_it_was() -> None:
    started = not dist.is_initialized()  # an earlier in-process engine test may have left its lone rank's group
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = SimpleNamespace(image_encoder=nn.Linear(2, 2), text_tower=None, eval=lambda: None, train=lambda: None)
        comp: Any = SimpleNamespace(dataset=None, evaluators=[("careless", DrawsFromEveryRng())])

        def seed() -> None:
            random.seed(0), np.random.seed(0), torch.manual_seed(0)

        seed()
        expected = _draws()
        seed()
        results = _evaluate(comp, model, torch.device("cpu"), "fp32", {"zero": 0})
        assert set(results) == {"careless/draws"}  # the evaluator did run, and drew
        assert _draws() == expected
    finally:
        if started:
            dist.destroy_process_group()
