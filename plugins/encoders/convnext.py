"""torchvision's ConvNeXt image tower (Liu et al. 2022), randomly initialised, with a projection head."""

from __future__ import annotations

from typing import Literal

import torch
import torchvision
from torch import nn

from plugins.encoders.checkpointing import run_block
from plugins.encoders.heads import make_head
from plugins.encoders.options import CONVNEXT_WIDTHS, check_drop_rate, convnext_grid
from plugins.encoders.options import nested_dims as checked_nested_dims
from plugins.encoders.options import small_input as use_small_input
from plugins.encoders.vit import image_transform


class ConvNeXt(nn.Module):
    """A ConvNeXt-T/S/B image encoder from torchvision (never pretrained weights), with a projection head.

    Liu et al. 2022, "A ConvNet for the 2020s", built by ``torchvision.models`` with ``weights=None``
    (nothing is downloaded); of the ImageNet classifier the final LayerNorm stays and the linear layer is
    replaced by the projection head (``plugins.encoders.heads``) on 768 (T, S) or 1024 (B) pooled features.
    The 4x4 stride-4 "patchify" stem and the three 2x2 stride-2 downsamplings divide the image by 32: a
    28px digit would vanish before the last stage. ``small_input`` therefore patchifies 2x2 with stride 2
    (28px: 14, 7, 3 and 1 pixels in the four stages; a stride-1 stem would keep 3x3 at the end for four times
    the compute); left out, it is on for ``image_size`` <= 64. ``stochastic_depth``: the drop-path rate of
    the last block (left out: torchvision's and the paper's ImageNet-1K rates, 0.1 / 0.4 / 0.5 for T / S / B).
    Images go through the ViT's transform (``in_channels`` channels, ``image_size``, [-1, 1]). The module
    names are torchvision's (``features``, ``avgpool``), plus ``norm`` (the classifier's LayerNorm) and
    ``proj`` for the head. ``nested_dims``: Matryoshka widths (Kusupati et al. 2022).
    """

    def __init__(
        self,
        arch: Literal["convnext_tiny", "convnext_small", "convnext_base"] = "convnext_tiny",
        image_size: int = 28,
        in_channels: int = 3,
        small_input: bool | None = None,
        stochastic_depth: float | None = None,
        embed_dim: int = 128,
        head: Literal["linear", "mlp", "none"] = "linear",
        head_layers: int = 2,
        head_hidden: int | None = None,
        head_norm: Literal["batch", "layer", "none"] = "batch",
        nested_dims: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if arch not in CONVNEXT_WIDTHS:
            raise ValueError(f"arch must be one of {', '.join(CONVNEXT_WIDTHS)}, not {arch!r}")
        width = CONVNEXT_WIDTHS[arch]
        self.embed_dim, self.image_size, self.in_channels = embed_dim, image_size, in_channels
        self.small_input = use_small_input(small_input, image_size)
        convnext_grid(image_size, self.small_input)
        check_drop_rate(stochastic_depth)
        self.nested_dims = checked_nested_dims(nested_dims, embed_dim)
        self.grad_checkpointing = False
        kwargs = {} if stochastic_depth is None else {"stochastic_depth_prob": stochastic_depth}
        net = getattr(torchvision.models, arch)(weights=None, **kwargs)
        if self.small_input or in_channels != 3:
            patch = 2 if self.small_input else 4
            stem = nn.Conv2d(in_channels, net.features[0][0].out_channels, kernel_size=patch, stride=patch)
            nn.init.trunc_normal_(stem.weight, std=0.02)  # torchvision's init
            nn.init.zeros_(stem.bias)
            net.features[0][0] = stem
        self.features, self.avgpool, self.norm = net.features, net.avgpool, net.classifier[0]
        self.proj = make_head(head, width, embed_dim, head_layers, head_hidden, head_norm)
        self.transform = image_transform(image_size, in_channels)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each ConvNeXt block's activations in the backward pass (``plugins.encoders.checkpointing``)."""
        self.grad_checkpointing = enabled

    def representation(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, width]``: the pooled, normalised backbone output before the projection head."""
        x = images.to(self.features[0][0].weight.dtype)  # fp32 pixels into a bf16/fp16 engine
        for i, part in enumerate(self.features):
            if i % 2:  # the stages (odd indices); the stem and the downsamplings run as they are
                for block in part:
                    x = run_block(block, self.grad_checkpointing, x)
            else:
                x = part(x)
        return torch.flatten(self.norm(self.avgpool(x)), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.representation(images))
