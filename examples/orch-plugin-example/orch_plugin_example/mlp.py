"""A small MLP image tower: resize, flatten, then a stack of Linear + GELU layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Preprocess:
    """Any C x H x W image in [0, 1] -> ``channels`` x ``size`` x ``size`` in [-1, 1] (picklable)."""

    def __init__(self, size: int, channels: int) -> None:
        self.size, self.channels = size, channels

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] != self.channels:  # grey <-> colour
            image = image.mean(0, keepdim=True).expand(self.channels, -1, -1)
        image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        return image * 2 - 1


class MLPEncoder(nn.Module):
    """MLP image encoder: the flattened, resized image through ``depth`` hidden layers to ``embed_dim``.

    ``transform`` resizes every image to ``image_size`` with ``channels`` channels (grey images are
    repeated, colour ones averaged when ``channels=1``) and maps [0, 1] to [-1, 1].
    """

    def __init__(self, image_size: int = 16, channels: int = 3, hidden: int = 256, depth: int = 2,
                 embed_dim: int = 128) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.transform = Preprocess(image_size, channels)
        layers: list[nn.Module] = [nn.Flatten()]
        width = channels * image_size**2
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.GELU()]
            width = hidden
        layers.append(nn.Linear(width, embed_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)
