"""MS-CLIP-S's lightweight image-only modules (You et al. 2022, Sec. 3.2): the early-specialisation conv stem and
the efficient parallel branch with its lateral adapters, as the authors' released B/32 and B/16 configs build
them (github.com/Hxyou/MSCLIP). Sizes follow the tower's width ``C`` and patch size, so they also fit 28-pixel
digits: the strides are 2 until the convolutions cover the patch, then 1 (B/32: 2,2,2,2,2; B/16: 2,2,2,2,1)."""

from __future__ import annotations

import math

import torch
from torch import nn

from plugins.encoders.options import MS_CLIP_STAGES, ms_clip_stage_sizes, ms_clip_strides
from plugins.encoders.vit import trunc_normal_


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


def _first_stage(in_channels: int, width: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn(in_channels, width // 16, 3, stride), nn.ReLU())


class _Residual(nn.Module):
    """``relu(body(x) + shortcut(x))`` with a strided 1x1-conv shortcut, as both of the official stages."""

    def __init__(self, body: list[nn.Module], cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)
        self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def _channels(width: int) -> list[int]:
    return [width // 16 * 2**i for i in range(MS_CLIP_STAGES)]  # C/16 ... C


def _init(module: nn.Module) -> None:
    """The official initialisation of the conv modules: truncated normal 0.02, no biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            trunc_normal_(m.weight, 0.02)


class EarlyConvStem(nn.Module):
    """Early specialisation: the image's first layer is convolutional instead of a patch embedding and a
    transformer block. A 3x3 conv to C/16, four basic residual stages (one 3x3 conv each) doubling to C, and a
    1x1 conv: ``[B, 3, H, W] -> [B, C, H / patch, W / patch]``."""

    def __init__(self, in_channels: int, width: int, patch_size: int) -> None:
        super().__init__()
        strides, channels = ms_clip_strides(patch_size), _channels(width)
        self.stages = nn.Sequential(_first_stage(in_channels, width, strides[0]), *(
            _Residual(_conv_bn(channels[i - 1], channels[i], 3, strides[i]), channels[i - 1], channels[i], strides[i])
            for i in range(1, MS_CLIP_STAGES)))
        self.last = nn.Conv2d(width, width, 1, bias=False)
        _init(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.last(self.stages(images))


class ParallelBranch(nn.Module):
    """The efficient parallel branch: a small CNN on the raw image (a 3x3 conv to C/16, then bottleneck
    residual stages, 1x1 -> strided 3x3 -> 1x1 at half the output channels, doubling towards C) whose k-th
    stage feeds the k-th lateral adapter. Only the ``adapters`` stages that are fused are built (all five in
    the released 12-layer configs); ``fuse`` runs one stage as the transformer reaches its adapter."""

    def __init__(self, in_channels: int, width: int, image_size: int, patch_size: int, adapters: int) -> None:
        super().__init__()
        strides, channels = ms_clip_strides(patch_size), _channels(width)
        sizes, grid = ms_clip_stage_sizes(image_size, patch_size), image_size // patch_size
        self.stages = nn.ModuleList([_first_stage(in_channels, width, strides[0])])
        for i in range(1, adapters):
            cin, cout, mid = channels[i - 1], channels[i], channels[i] // 2
            body = [*_conv_bn(cin, mid, 1), nn.ReLU(), *_conv_bn(mid, mid, 3, strides[i]), nn.ReLU(),
                    *_conv_bn(mid, cout, 1)]
            self.stages.append(_Residual(body, cin, cout, strides[i]))
        self.adapters = nn.ModuleList(LateralAdapter(channels[k], width, sizes[k], grid) for k in range(adapters))
        _init(self)

    def fuse(self, k: int, tokens: torch.Tensor, previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage ``k`` of the branch (from the image for k = 0, else from stage k - 1) fused into the tokens;
        returns the new tokens and the stage, which stage k + 1 starts from."""
        stage = self.stages[k](previous)
        return self.adapters[k](tokens, stage), stage


class LateralAdapter(nn.Module):
    """Fuses a branch stage into the tokens before a transformer block: ``LN(dw3x3(tokens) + t2b(stage))``, where
    ``t2b`` is a depthwise conv whose kernel and stride bring the stage to the token grid, batch norm and a 1x1
    conv to C. A class token passes the token path unchanged and is added to itself (the official USECLS)."""

    def __init__(self, channels: int, width: int, stage_size: int, grid: int) -> None:
        super().__init__()
        kernel = math.ceil(stage_size / grid)  # kernel = stride, and the padding that lands on the grid
        padding = math.ceil((grid * kernel - stage_size) / 2)
        self.grid = grid
        self.t2b = nn.Sequential(nn.Conv2d(channels, channels, kernel, kernel, padding, groups=channels, bias=False),
                                 nn.BatchNorm2d(channels), nn.Conv2d(channels, width, 1, bias=False))
        self.tokens = nn.Sequential(*_conv_bn(width, width, 3, groups=width))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, stage: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        cls, patches = x[:, : n - self.grid**2], x[:, n - self.grid**2:]
        patches = self.tokens(patches.transpose(1, 2).reshape(b, w, self.grid, self.grid)).flatten(2).transpose(1, 2)
        fused = self.t2b(stage).flatten(2).transpose(1, 2)
        return self.norm(torch.cat([cls, patches], 1) + torch.cat([cls, fused], 1))
