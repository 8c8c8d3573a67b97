"""Evaluating in the middle of a run must not move any global RNG the training steps draw from: an evaluator
from a plugin may shuffle with Python's `random` or numpy, and a loss or augmentation may draw from either. A stop
request stops an evaluation between batches."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orchestrator.engine.evaluation import EvalContext, EvalInterrupted, SplitImages
from orchestrator.engine.train import StopAsked, _evaluate
from orchestrator.testing import eval_context
from tests.conftest import AliveImages


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
        results = _evaluate(comp, model, torch.device("cpu"), "fp32", {"zero": 0, "workers": 0})
        assert set(results) == {"careless/draws"}  # the evaluator did run, and drew
        assert _draws() == expected
    finally:
        if started:
            dist.destroy_process_group()


class _Counting(nn.Module):
    """An image encoder that counts its batches."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 2)
        self.batches = 0

    @staticmethod
    def transform(image: torch.Tensor) -> torch.Tensor:
        return image

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        return self.proj(images)


class EncodesEverything:
    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        return {"mean": float(ctx.encode_images([torch.rand(4) for _ in range(10)]).mean())}


def test_a_stop_request_interrupts_the_encoders_between_batches() -> None:
    encoder = _Counting()
    calls = []

    def stop_asked() -> bool:
        calls.append(1)
        return len(calls) > 2  # asked while the second batch was being encoded

    ctx = EvalContext(encoder, None, None, torch.device("cpu"), batch_size=2, stop_asked=stop_asked)
    with pytest.raises(EvalInterrupted):
        ctx.encode_images([torch.rand(4) for _ in range(10)])
    assert encoder.batches == 2  # of 5: the third never started
    assert EvalContext(_Counting(), None, None, torch.device("cpu")).encode_images([torch.rand(4)]).shape == (1, 2)


def test_a_split_is_encoded_one_batch_of_decoded_images_at_a_time() -> None:
    """``encode_split`` (the kNN bank is the whole train split) holds one batch of decoded images, not the split,
    and gives the embeddings of encoding them all at once; ``SplitImages`` slices lazily."""
    ctx = eval_context(text=False)
    split = AliveImages(ctx.dataset.train)
    everything = torch.stack([ctx.image_encoder.transform(split[i]["image"]) for i in range(len(split))])
    split.most_alive = 0
    ctx.batch_size = 4
    features, labels = ctx.encode_split(split)
    assert split.most_alive <= 5 and split.alive == 0  # a batch, and the next image read
    with torch.no_grad():
        assert torch.allclose(features, F.normalize(ctx.image_encoder(everything), dim=-1), atol=1e-6)
    assert labels.tolist() == list(split.labels)
    view = SplitImages(split)[3:11][1::2]
    assert len(view) == 4 and all(torch.equal(view[k], split[4 + 2 * k]["image"]) for k in range(4))
    with pytest.raises(IndexError):
        view[4]


def test_loader_workers_decode_a_split_into_the_same_embeddings_in_order() -> None:
    """With ``workers`` (a run's --workers), a split's images are decoded by loader processes, as in training: the
    same embeddings in the same order as decoding them here, and a stop request still ends it between batches."""
    ctx = eval_context(text=False)
    ctx.batch_size = 4
    expected, labels = ctx.encode_split(ctx.dataset.train)
    ctx.workers = 2
    features, same_labels = ctx.encode_split(ctx.dataset.train)
    assert torch.equal(features, expected) and torch.equal(labels, same_labels)
    assert torch.allclose(ctx.encode_images(SplitImages(ctx.dataset.train)[5:]), expected[5:], atol=1e-6)
    ctx.stop_asked = lambda: True
    with pytest.raises(EvalInterrupted):
        ctx.encode_split(ctx.dataset.train)


@pytest.mark.parametrize("zero, interrupted", [(0, True), (3, False)])
def test_evaluate_returns_none_when_interrupted_except_under_zero_3(zero: int, interrupted: bool,
                                                                    tmp_path: Path) -> None:
    """Interrupted, ``_evaluate`` gives None (every rank agrees: the engine then saves the step and evaluates it on
    resume), keeps the RNGs and puts the model back in training mode. Under ZeRO-3 every rank evaluates together,
    so a request on rank 0 alone cannot end it: it runs to the end."""
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        modes = []
        model = SimpleNamespace(image_encoder=_Counting(), text_tower=None, eval=lambda: modes.append("eval"),
                                train=lambda: modes.append("train"))
        comp: Any = SimpleNamespace(dataset=None, evaluators=[("all", EncodesEverything())])
        torch.manual_seed(0)
        expected = torch.rand(())
        torch.manual_seed(0)
        request = tmp_path / "attempt-1.stop"
        request.touch()  # the worker's stop request, there from the start
        results = _evaluate(comp, model, torch.device("cpu"), "fp32", {"zero": zero, "workers": 0},
                            stop_asked=StopAsked(request))
        assert (results is None) == interrupted and modes == ["eval", "train"]
        assert torch.rand(()) == expected
    finally:
        if started:
            dist.destroy_process_group()


def test_the_evaluation_bench_times_encode_split_per_worker_count(tmp_path: Path) -> None:
    """bench/evaluate.py, small: every worker count encodes the whole train split of the JPEGs it writes, each
    round, and the table shows each rate against the first count's."""
    import json
    import subprocess
    import sys

    out = tmp_path / "evaluate.json"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "bench/evaluate.py", "--images", "20", "--source-size", "40",
                             "--workers", "0,1", "--rounds", "2", "--json", str(out)],
                            cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["split"] == 16 and [r["workers"] for r in report["results"]] == [0, 1]
    assert all(len(r["seconds"]) == 2 and r["images_per_s"] > 0 for r in report["results"])
    assert "| 1       |" in result.stdout and "vs workers 0" in result.stdout
