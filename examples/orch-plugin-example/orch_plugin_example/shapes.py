"""Synthetic shapes: small images of circles, squares, triangles and crosses drawn with torch from a seed."""

from __future__ import annotations

import torch

from orchestrator.data import labelled_splits

CLASS_NAMES = ("circle", "square", "triangle", "cross")
TEMPLATES = ("a drawing of a {}.", "a {} on a dark background.", "a small {}.")


def draw(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One 3 x size x size image per label: a shape of random colour, position and radius on noise."""
    n = len(labels)
    centre = torch.rand(n, 2, 1, 1, generator=generator) * 0.4 + 0.3  # in [0.3, 0.7] of the side
    radius = (torch.rand(n, 1, 1, generator=generator) * 0.1 + 0.15) * size
    colour = torch.rand(n, 3, 1, 1, generator=generator) * 0.6 + 0.4
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    dy, dx = ys - centre[:, 0] * size, xs - centre[:, 1] * size  # n x size x size
    masks = torch.stack([
        dx**2 + dy**2 <= radius**2,                                                  # circle
        (dx.abs() <= radius * 0.8) & (dy.abs() <= radius * 0.8),                     # square
        (dy <= radius * 0.7) & (dy >= -radius) & (dx.abs() <= (dy + radius) * 0.6),  # triangle, apex up
        ((dx.abs() <= radius / 3) | (dy.abs() <= radius / 3)) & (dx.abs() <= radius) & (dy.abs() <= radius),
    ])[labels, torch.arange(n)]
    noise = torch.rand(n, 3, size, size, generator=generator) * 0.15
    return torch.where(masks[:, None], colour, noise).clamp(0.0, 1.0)


class Shapes:
    """Synthetic images of 4 simple shapes with captions and labels; fixed held-out split (fast, no files).

    ``per_class`` images of each class are drawn with a generator seeded with ``seed`` (the same seed
    gives the same dataset); the held-out ``test`` split is the last ``test_fraction`` of each class.
    """

    def __init__(self, per_class: int = 64, image_size: int = 16, seed: int = 0, test_fraction: float = 0.25):
        if per_class < 2 or image_size < 8:
            raise ValueError("per_class must be at least 2 and image_size at least 8")
        self.class_names, self.templates = list(CLASS_NAMES), list(TEMPLATES)
        labels = torch.arange(len(CLASS_NAMES)).repeat(per_class)  # classes interleaved
        images = draw(labels, image_size, torch.Generator().manual_seed(seed))
        self.train, self.test = labelled_splits(images, labels.tolist(), CLASS_NAMES, TEMPLATES, test_fraction)
