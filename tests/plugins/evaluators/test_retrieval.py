"""retrieval: image-text Recall@K; only a sample's own caption counts, ties count in expectation."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from probe_data import PixelIdImage, mark, marked_mnist
from torch import nn

from orchestrator.data import LabelledSplit
from orchestrator.engine.evaluation import EvalContext
from orchestrator.registry import Registry
from orchestrator.testing import assert_light, check, eval_context
from plugins.evaluators.retrieval import Retrieval, expected_recall
from tests.conftest import AliveImages


class NumberText(nn.Module):
    """One-hot of the first number in the caption (``mapping`` permutes them)."""

    def __init__(self, ids: int, mapping=None):
        super().__init__()
        self.embed_dim = ids
        self.mapping = torch.arange(ids) if mapping is None else torch.as_tensor(mapping)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([int("".join(ch for ch in t if ch.isdigit())) for t in texts])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.one_hot(self.mapping[tokens], self.embed_dim).float()


def paired(n: int = 40) -> SimpleNamespace:
    """n samples, each image marked with its own id, each caption naming it: identical features per pair."""
    images = mark(torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(0)), range(n), n)
    test = LabelledSplit(images, [0] * n, [f"sample {i}" for i in range(n)])
    return SimpleNamespace(test=test, train=test)


def test_identical_image_and_text_features_give_100():
    ctx = EvalContext(PixelIdImage(40), NumberText(40), paired(40), torch.device("cpu"), batch_size=7)
    evaluator = Retrieval()
    assert evaluator.evaluate(ctx) == {f"{d}_r{k}": 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert evaluator.protocol()["pairs"] == 40 and evaluator.protocol()["distinct_captions"] == 40


def test_the_images_are_decoded_one_batch_at_a_time():
    """A split of a million 224 px images is 600 GB as floats: the evaluator must not list them all first."""
    data = paired(40)
    data.test = AliveImages(data.test)
    ctx = EvalContext(PixelIdImage(40), NumberText(40), data, torch.device("cpu"), batch_size=7)
    assert Retrieval().evaluate(ctx)["i2t_r1"] == 100.0
    assert data.test.most_alive <= 8 and data.test.alive == 0  # a batch, and the next image read


def test_mismatched_pairs_and_a_near_miss():
    shifted = [(i + 1) % 40 for i in range(40)]
    ctx = EvalContext(PixelIdImage(40), NumberText(40, shifted), paired(40), torch.device("cpu"))
    # one-hot features: the positive scores 0, one wrong candidate 1, the 38 others tie with the positive at 0
    metrics = Retrieval().evaluate(ctx)
    for direction in ("i2t", "t2i"):
        assert [metrics[f"{direction}_r{k}"] for k in (1, 5, 10)] == pytest.approx([0.0, 100 * 4 / 39, 100 * 9 / 39])
    # image i's embedding points somewhat at caption i+1, so the positive ranks second
    images = F.normalize(torch.eye(5) + 0.5 * torch.eye(5).roll(1, dims=1), dim=-1)
    assert expected_recall(images, torch.eye(5), torch.arange(5).roll(-1), ks=(1, 2)) == {1: 0.0, 2: 100.0}


def test_only_the_exact_pair_counts_on_mnist():
    data = marked_mnist()  # a class-perfect image tower
    ctx = EvalContext(PixelIdImage(10), NumberText(10), data, torch.device("cpu"), batch_size=500)
    metrics = Retrieval().evaluate(ctx)
    # each test image ties with the 100 captions of its class (and each caption with 100 images): R@K = K%
    for direction in ("i2t", "t2i"):
        assert [round(metrics[f"{direction}_r{k}"], 9) for k in (1, 5, 10)] == [1.0, 5.0, 10.0]


def test_expected_recall_with_ties_by_hand():
    candidates = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    query = torch.tensor([[1.0, 0.0]])
    # the positive ties with 2 others: rank 0, 1 or 2 with equal chance
    assert expected_recall(query, candidates, torch.tensor([1]), ks=(1, 2, 3)) == pytest.approx(
        {1: 100 / 3, 2: 200 / 3, 3: 100.0})
    # a positive below 3 candidates: never in the top 3
    assert expected_recall(query, candidates, torch.tensor([3]), ks=(3, 4)) == {3: 0.0, 4: 100.0}


def test_registration_and_contract():
    assert_light("plugins.evaluators")
    registry = Registry.load()
    component = registry.get("evaluator", "retrieval")
    assert component.declared == {"needs": {"text", "text-tower"}}
    evaluator = check("evaluator", "retrieval", registry)
    assert set(evaluator.evaluate(eval_context())) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
