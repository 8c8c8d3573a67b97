"""Projection heads shared by the built-in encoders: CLIP's linear map, SimCLR's MLP, or none.

``head="linear"``: a bias-free linear map from the trunk's features to ``embed_dim``, the CLIP towers'
projection (Radford et al. 2021). ``head="mlp"``: SimCLR's projection head g(.) (Chen et al. 2020, "A Simple
Framework for Contrastive Learning of Visual Representations"), ``head_layers`` linear maps with a norm and
a ReLU between them (two in SimCLR, three in SimCLRv2). ``head="none"``: the trunk's features themselves
(``embed_dim`` must equal the trunk's width). The option checks are in ``plugins.encoders.options``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from plugins.encoders.options import check_head

Head = Literal["linear", "mlp", "none"]
HeadNorm = Literal["batch", "layer", "none"]


def _norm(kind: str, dim: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm1d(dim)
    return nn.LayerNorm(dim) if kind == "layer" else nn.Identity()


class MLPHead(nn.Sequential):
    """SimCLR's projection head: (Linear, norm, ReLU) x (layers - 1), then a bias-free Linear.

    The hidden linear maps have no bias when a norm follows them (it would cancel). Any leading dimensions
    are flattened around the call, so per-token features ``[B, T, width]`` go through it too (batch norm
    then takes its statistics over all tokens).
    """

    def __init__(self, width: int, embed_dim: int, layers: int = 2, hidden: int | None = None,
                 norm: HeadNorm = "batch") -> None:
        hidden = hidden or width
        modules: list[nn.Module] = []
        dim = width
        for _ in range(layers - 1):
            modules += [nn.Linear(dim, hidden, bias=norm == "none"), _norm(norm, hidden), nn.ReLU(inplace=True)]
            dim = hidden
        modules.append(nn.Linear(dim, embed_dim, bias=False))
        super().__init__(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def make_head(head: Head, width: int, embed_dim: int, layers: int = 2, hidden: int | None = None,
              norm: HeadNorm = "batch") -> nn.Module:
    """The projection head ``head`` from ``width`` features to ``embed_dim`` (``ValueError`` if it cannot be)."""
    check_head(head, width, embed_dim, layers, hidden, norm)
    if head == "linear":
        return nn.Linear(width, embed_dim, bias=False)
    if head == "mlp":
        return MLPHead(width, embed_dim, layers, hidden, norm)
    return nn.Identity()
