"""Shared test data for the probe and retrieval evaluators: images whose pixel (0, 0) encodes an id, and an
image tower that reads it back as a one-hot (a perfectly separating feature)."""

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.data import LabelledSplit
from plugins.datasets.mnist import MNIST


class PixelIdImage(nn.Module):
    """One-hot of the id that ``mark`` wrote into pixel (0, 0) (value = id / (ids - 1))."""

    def __init__(self, ids: int):
        super().__init__()
        self.embed_dim = ids
        self.transform = nn.Identity()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.one_hot((images[:, 0, 0, 0] * (self.embed_dim - 1)).round().long(), self.embed_dim).float()


def mark(images: torch.Tensor, ids, n_ids: int) -> torch.Tensor:
    images = images.clone()
    images[:, 0, 0, 0] = torch.as_tensor(ids, dtype=torch.float32) / (n_ids - 1)
    return images


def marked_mnist() -> MNIST:
    """The shipped MNIST with each image's digit written into its pixel (0, 0): ``PixelIdImage(10)`` is perfect."""
    data = MNIST()
    data.train.images = mark(data.train.images, data.train.labels, 10)
    data.test.images = mark(data.test.images, data.test.labels, 10)
    return data


def synthetic(classes: int = 5, train_per_class: int = 20, test_per_class: int = 10, shuffle: bool = False,
              seed: int = 0) -> SimpleNamespace:
    """Random 1 x 4 x 4 images marked with their class (or, with ``shuffle``, with a random class)."""
    generator = torch.Generator().manual_seed(seed)
    splits = []
    for per_class in (train_per_class, test_per_class):
        labels = [c for c in range(classes) for _ in range(per_class)]
        marks = torch.randint(0, classes, (len(labels),), generator=generator) if shuffle else labels
        images = mark(torch.rand(len(labels), 1, 4, 4, generator=generator), marks, classes)
        splits.append(LabelledSplit(images, labels, [f"class {y}" for y in labels]))
    return SimpleNamespace(train=splits[0], test=splits[1], class_names=[f"class {c}" for c in range(classes)],
                           templates=["{}"])
