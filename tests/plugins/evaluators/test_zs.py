"""zs: CLIP zero-shot classification on real MNIST, with hand-made encoders whose answer is known."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from probe_data import mark, marked_mnist
from torch import nn

from orchestrator.data import LabelledSplit
from orchestrator.engine.evaluation import EvalContext
from plugins.evaluators.zs import ZeroShot, zero_shot_classifier

CLASSES = 10


class PixelClassImage(nn.Module):
    """One-hot of the class id that the test wrote into pixel (0, 0) of each image (value = id / 9)."""

    embed_dim = CLASSES

    def __init__(self):
        super().__init__()
        self.transform = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.one_hot((images[:, 0, 0, 0] * 9).round().long(), CLASSES).float()


class DigitText(nn.Module):
    """One-hot of ``mapping[d]`` for the digit d in the caption (tokens: the digit, CLIP-template flag)."""

    embed_dim = CLASSES

    def __init__(self, mapping=None, wrong_first_template=False):
        super().__init__()
        self.mapping = torch.arange(CLASSES) if mapping is None else torch.as_tensor(mapping)
        self.wrong_first_template = wrong_first_template

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        digits = [int(next(ch for ch in t if ch.isdigit())) for t in texts]
        first = [t.startswith("a photo of the number") for t in texts]
        return torch.tensor([digits, first]).T

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        digits, first = tokens[:, 0], tokens[:, 1].bool()
        out = F.one_hot(self.mapping[digits], CLASSES).float()
        if self.wrong_first_template:  # CLIP's template votes for the next class with a 100x larger norm
            out[first] = 100 * F.one_hot((self.mapping[digits[first]] + 1) % CLASSES, CLASSES).float()
        return out


@pytest.fixture(scope="module")
def mnist():
    return marked_mnist()


def context(dataset, text=None, image=None) -> EvalContext:
    image = PixelClassImage() if image is None else image
    text = DigitText() if text is None else text
    return EvalContext(image, text, dataset, torch.device("cpu"), batch_size=300)


def test_perfect_encoders_score_100(mnist):
    assert ZeroShot().evaluate(context(mnist)) == {"top1": 100.0, "top5": 100.0}


def test_permuted_text_tower_scores_0(mnist):
    shifted = [(d + 1) % CLASSES for d in range(CLASSES)]
    metrics = ZeroShot().evaluate(context(mnist, text=DigitText(shifted)))
    assert metrics["top1"] == 0.0


def test_shuffled_labels_score_chance(mnist):
    generator = torch.Generator().manual_seed(0)
    shuffled = torch.tensor(mnist.test.labels)[torch.randperm(len(mnist.test), generator=generator)]
    test = LabelledSplit(mark(mnist.test.images, shuffled, 10), mnist.test.labels, mnist.test.captions)
    data = SimpleNamespace(test=test, class_names=mnist.class_names, templates=mnist.templates)
    metrics = ZeroShot().evaluate(context(data))
    agree = (shuffled == torch.tensor(mnist.test.labels)).sum().item()
    assert metrics["top1"] == 100 * agree / 1000  # exactly the images whose shuffled id is right
    assert 5.0 < metrics["top1"] < 15.0  # 10 classes: chance is 10%
    assert metrics["top5"] >= metrics["top1"]


def test_templates_are_normalised_before_averaging(mnist):
    # One template of five points at the wrong class with a 100x norm: averaging raw embeddings would
    # follow it (0% top-1); CLIP's ensemble averages unit vectors, so the other four win.
    metrics = ZeroShot().evaluate(context(mnist, text=DigitText(wrong_first_template=True)))
    assert metrics["top1"] == 100.0
    classifier = zero_shot_classifier(context(mnist, text=DigitText(wrong_first_template=True)),
                                      mnist.class_names, mnist.templates)
    expected = F.normalize(torch.eye(CLASSES) * 4 / 5 + torch.eye(CLASSES).roll(1, dims=1) / 5, dim=-1)
    assert torch.allclose(classifier, expected)
    assert torch.allclose(classifier.norm(dim=-1), torch.ones(CLASSES))


def test_split_option_and_protocol(mnist):
    evaluator = ZeroShot(split="train")
    assert evaluator.evaluate(context(mnist))["top1"] == 100.0
    protocol = evaluator.protocol()
    assert protocol["split"] == "train" and protocol["samples"] == 4000
    assert protocol["templates"] == len(mnist.templates) == 5 and protocol["classes"] == 10
    assert "normalised" in protocol["ensemble"] and protocol["logit_scale"] == 100.0
    assert ZeroShot().protocol()["split"] == "test"


def test_no_top5_with_five_classes_or_fewer(mnist):
    keep = [i for i, y in enumerate(mnist.test.labels) if y < 5]
    test = LabelledSplit(mnist.test.images[keep], [mnist.test.labels[i] for i in keep])
    data = SimpleNamespace(test=test, class_names=mnist.class_names[:5], templates=mnist.templates)
    assert ZeroShot().evaluate(context(data)) == {"top1": 100.0}


def test_shared_tower_is_called_with_its_modality(mnist):
    class Shared(nn.Module):
        embed_dim = CLASSES

        def __init__(self):
            super().__init__()
            self.image, self.text = PixelClassImage(), DigitText()
            self.transform, self.tokenize = self.image.transform, self.text.tokenize

        def forward(self, x, modality):
            return self.image(x) if modality == "image" else self.text(x)

    shared = Shared()
    assert ZeroShot().evaluate(context(mnist, text=shared, image=shared))["top1"] == 100.0
