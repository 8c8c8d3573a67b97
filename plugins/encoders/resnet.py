"""torchvision's ResNet image tower (He et al. 2016), randomly initialised, with a projection head."""

from __future__ import annotations

from typing import Literal

import torch
import torchvision
from torch import nn

from plugins.encoders.checkpointing import run_block
from plugins.encoders.heads import make_head
from plugins.encoders.options import RESNET_WIDTHS
from plugins.encoders.options import nested_dims as checked_nested_dims
from plugins.encoders.options import small_input as use_small_input
from plugins.encoders.vit import image_transform


class ResNet(nn.Module):
    """A ResNet-18/34/50 image encoder from torchvision (never pretrained weights), with a projection head.

    He et al. 2016, "Deep Residual Learning for Image Recognition", built by ``torchvision.models`` with
    ``weights=None`` (nothing is downloaded); the ImageNet classifier is replaced by the projection head
    (``plugins.encoders.heads``: CLIP's linear map by default, ``head=mlp`` for SimCLR's g(.)) after global
    average pooling of 512 (ResNet-18/34) or 2048 (ResNet-50) features. ``small_input`` swaps the 7x7
    stride-2 stem and its max-pool for one 3x3 stride-1 convolution, as SimCLR does for CIFAR-10's 32x32
    images (Chen et al. 2020, appendix B.9), so that a 28px digit still has 4x4 features in the last stage
    (instead of 1x1); left out, it is on for ``image_size`` <= 64. Images go through the ViT's transform:
    ``in_channels`` channels, resized to ``image_size``, mapped to [-1, 1]. The module names are
    torchvision's (``conv1``, ``bn1``, ``layer1``...``layer4``), plus ``proj`` for the head, so a torchvision
    ResNet state dict loads with ``strict=False`` (its ``fc`` is left out). ``nested_dims``: Matryoshka widths.
    """

    def __init__(
        self,
        arch: Literal["resnet18", "resnet34", "resnet50"] = "resnet18",
        image_size: int = 28,
        in_channels: int = 3,
        small_input: bool | None = None,
        embed_dim: int = 128,
        head: Literal["linear", "mlp", "none"] = "linear",
        head_layers: int = 2,
        head_hidden: int | None = None,
        head_norm: Literal["batch", "layer", "none"] = "batch",
        nested_dims: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if arch not in RESNET_WIDTHS:
            raise ValueError(f"arch must be one of {', '.join(RESNET_WIDTHS)}, not {arch!r}")
        width = RESNET_WIDTHS[arch]
        self.embed_dim, self.image_size, self.in_channels = embed_dim, image_size, in_channels
        self.small_input = use_small_input(small_input, image_size)
        self.nested_dims = checked_nested_dims(nested_dims, embed_dim)
        self.grad_checkpointing = False
        net = getattr(torchvision.models, arch)(weights=None)
        stem = None
        if self.small_input:
            stem = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            stem = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if stem is not None:
            nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
            net.conv1 = stem
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"):
            setattr(self, name, getattr(net, name))
        self.proj = make_head(head, width, embed_dim, head_layers, head_hidden, head_norm)
        self.transform = image_transform(image_size, in_channels)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each residual block's activations in the backward pass (``plugins.encoders.checkpointing``)."""
        self.grad_checkpointing = enabled

    def representation(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, width]``: the pooled backbone output before the projection head (SimCLR's h)."""
        x = images.to(self.conv1.weight.dtype)  # fp32 pixels into a bf16/fp16 engine
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = run_block(block, self.grad_checkpointing, x)
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.representation(images))
