"""knn: weighted kNN (Wu et al. 2018 / DINO) on real MNIST with a hand-made encoder whose answer is known."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from probe_data import mark, marked_mnist
from torch import nn

from orchestrator.data import LabelledSplit
from orchestrator.engine.evaluation import EvalContext
from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.testing import assert_light, check, check_evaluator, eval_context
from plugins.evaluators import knn as knn_module
from plugins.evaluators.knn import KNN, knn_votes

CLASSES = 10


class PixelClassImage(nn.Module):
    """One-hot of the class id written into pixel (0, 0) (value = id / 9), plus a little noise."""

    embed_dim = CLASSES + 4

    def __init__(self):
        super().__init__()
        self.transform = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        onehot = F.one_hot((images[:, 0, 0, 0] * 9).round().long(), CLASSES).float()
        return torch.cat([onehot, 0.1 * images[:, 0, 5:7, 5:7].flatten(1)], dim=1)


@pytest.fixture(scope="module")
def mnist():
    return marked_mnist()


def context(dataset) -> EvalContext:
    return EvalContext(PixelClassImage(), None, dataset, torch.device("cpu"), batch_size=500)


def test_separating_features_score_100(mnist):
    evaluator = KNN()
    assert evaluator.evaluate(context(mnist)) == {"top1": 100.0, "top5": 100.0}
    protocol = evaluator.protocol()
    assert protocol["k"] == 20 and protocol["temperature"] == 0.07
    assert protocol["bank_split"] == "train" and protocol["eval_split"] == "test"
    assert protocol["bank_samples"] == len(mnist.train) and protocol["eval_samples"] == len(mnist.test)
    assert protocol["classes"] == 10


def test_shuffled_bank_labels_score_chance(mnist):
    generator = torch.Generator().manual_seed(0)
    shuffled = torch.tensor(mnist.train.labels)[torch.randperm(len(mnist.train), generator=generator)]
    # the features follow the shuffled ids, the labels the true classes: neighbours carry no information
    train = LabelledSplit(mark(mnist.train.images, shuffled, 10), mnist.train.labels)
    data = SimpleNamespace(train=train, test=mnist.test, class_names=mnist.class_names)
    metrics = KNN().evaluate(context(data))
    assert 3.0 < metrics["top1"] < 20.0  # 10 classes: chance is 10%
    assert 30.0 < metrics["top5"] < 70.0  # chance is 50%


def test_hand_computed_votes():
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    labels = torch.tensor([0, 1, 1, 0])
    query = torch.tensor([[1.0, 0.0]])
    # k=3: neighbours have similarities 1.0 (class 0), 0.8 (class 1), 0.6 (class 1)
    votes = knn_votes(bank, labels, query, classes=2, k=3, temperature=0.5)
    expected = torch.tensor([[math.exp(1.0 / 0.5), math.exp(0.8 / 0.5) + math.exp(0.6 / 0.5)]])
    assert torch.allclose(votes, expected)
    assert votes.argmax().item() == 1  # two close neighbours outvote one closer one at T=0.5
    sharp = knn_votes(bank, labels, query, classes=2, k=3, temperature=0.07)
    assert sharp.argmax().item() == 0  # a small temperature lets the nearest neighbour win
    assert torch.allclose(knn_votes(bank, labels, query, classes=2, k=10, temperature=0.5),
                          knn_votes(bank, labels, query, classes=2, k=4, temperature=0.5))  # k capped at N


def test_blocks_give_the_same_votes(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(50, 8, generator=generator), dim=-1)
    queries = F.normalize(torch.randn(33, 8, generator=generator), dim=-1)
    labels = torch.randint(0, 4, (50,), generator=generator)
    whole = knn_votes(bank, labels, queries, 4, k=5)
    monkeypatch.setattr(knn_module, "SIMILARITY_BUDGET", 50 * 7)  # blocks of 7 queries
    assert torch.allclose(knn_votes(bank, labels, queries, 4, k=5), whole)


def test_no_top5_with_few_classes_and_contract():
    ctx = eval_context(text=False)
    results = check_evaluator(KNN(k=3), ctx)
    assert set(results) == {"top1"}
    with pytest.raises(UserError, match="k >= 1"):
        KNN(k=0)


def test_registration():
    assert_light("plugins.evaluators")
    registry = Registry.load()
    component = registry.get("evaluator", "knn")
    assert component.declared == {"needs": {"label"}}
    assert [(o.name, o.default) for o in component.options] == [("k", 20), ("temperature", 0.07),
                                                                 ("representation", "auto")]
    assert isinstance(check("evaluator", "knn", registry, k=5), KNN)


class NoisyHead(PixelClassImage):
    """Its representation separates the classes; its projection head (forward) throws that away."""

    def representation(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randn(len(images), self.embed_dim, generator=torch.Generator().manual_seed(len(images)))


def test_backbone_representation_is_read_before_the_head(mnist):
    ctx = EvalContext(NoisyHead(), None, mnist, torch.device("cpu"), batch_size=500)
    backbone = KNN(representation="backbone")
    assert backbone.evaluate(ctx)["top1"] == 100.0
    assert backbone.protocol()["representation"] == "backbone"
    embedding = KNN(representation="embedding")
    assert embedding.evaluate(ctx)["top1"] < 20.0  # random features, chance is 10%
    assert embedding.protocol()["representation"] == "embedding"


def test_auto_reads_the_backbone_when_the_encoder_has_one(mnist):
    """The default: the representation before the head where there is one, else the output; recorded."""
    with_backbone = KNN()
    assert with_backbone.evaluate(EvalContext(NoisyHead(), None, mnist, torch.device("cpu")))["top1"] == 100.0
    assert with_backbone.protocol()["representation"] == "backbone"
    without = KNN()
    without.evaluate(context(mnist))
    assert without.protocol()["representation"] == "embedding"


def test_backbone_without_a_representation_method_is_one_line(mnist):
    with pytest.raises(UserError, match="has no representation\\(images\\) method; use representation=embedding"):
        KNN(representation="backbone").evaluate(context(mnist))
