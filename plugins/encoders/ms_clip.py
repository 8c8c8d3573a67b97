"""One transformer shared by the image and the text modality, MS-CLIP (You et al. 2022)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from plugins.encoders.ms_clip_convs import EarlyConvStem, ParallelBranch
from plugins.encoders.options import check_ms_clip
from plugins.encoders.text_transformer import EOS, VOCAB, TextTransformer
from plugins.encoders.vit import Block, image_transform, init_blocks, trunc_normal_

MODALITIES = ("image", "text")


class SharedBlock(Block):
    """A pre-LN block whose attention and MLP serve both modalities, with one pair of LayerNorms per modality
    (MS-CLIP's best sharing: everything but the LayerNorms)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__(width, heads, mlp_ratio)
        del self.ln_1, self.ln_2
        self.norms = nn.ModuleDict({m: nn.ModuleList([nn.LayerNorm(width), nn.LayerNorm(width)]) for m in MODALITIES})

    def forward(self, x: torch.Tensor, modality: str, causal: bool = False) -> torch.Tensor:  # type: ignore[override]
        ln_1, ln_2 = self.norms[modality]
        b, t, w = x.shape
        q, k, v = self.qkv(ln_1(x)).view(b, t, 3, self.heads, w // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, w))
        return x + self.mlp(ln_2(x))


class MSCLIP(nn.Module):
    """A modality-shared transformer for image and text (MS-CLIP), with a tunable number of shared layers.

    You et al. 2022, "Learning Visual Representation from Modality-Shared Contrastive Language-Image
    Pre-training". Images are cut into patches and embedded as in ``vit``; captions are UTF-8 bytes embedded
    as in ``text-transformer`` (same tokenizer). Each modality has its own embeddings, positions, LayerNorms
    and projection; of the ``depth`` blocks, the last ``shared_layers`` (all by default: the paper's
    "share everything but LayerNorms") have one set of attention and MLP weights for both modalities, the
    first ``depth - shared_layers`` are modality-specific, which spans the spectrum from one shared tower
    (``shared_layers=depth``) to two separate towers (``shared_layers=0``). Specific layers come first
    because low-level features differ most between pixels and bytes. Images attend both ways and are pooled
    by ``pool`` (``mean`` of the patch tokens or a ``cls`` token); text is causal and read at its end-of-text
    token, as in CLIP. ``forward(x, modality="image" | "text")``.

    MS-CLIP-S's lightweight modality-specific modules (Sec. 3.2; ``plugins.encoders.ms_clip_convs``), off by
    default as in the paper's base MS-CLIP: ``early_conv`` makes the image's first layer a conv stem (in place
    of the patch embedding and the first block; text keeps a specific first block, and ``shared_layers``
    defaults to ``depth - 1``); ``parallel_branch`` runs a small CNN on the image beside the transformer and
    adds its k-th stage to the tokens before image layer 2k + 2 (layers counted from 0, the stem included; at
    most 5 adapters: layers 2, 4, 6, 8, 10 of 12, as the released configs).
    """

    def __init__(
        self,
        image_size: int = 28,
        patch_size: int = 7,
        in_channels: int = 3,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        embed_dim: int = 128,
        shared_layers: int | None = None,
        pool: Literal["cls", "mean"] = "mean",
        context_length: int = 32,
        early_conv: bool = False,
        parallel_branch: bool = False,
    ) -> None:
        super().__init__()
        shared = check_ms_clip(image_size, patch_size, width, depth, heads, shared_layers, pool, context_length,
                               early_conv, parallel_branch)
        stem = int(early_conv)  # the conv stem is the image's first layer
        self.embed_dim, self.pool, self.context_length = embed_dim, pool, context_length
        grid = image_size // patch_size
        self.patch_embed = (EarlyConvStem(in_channels, width, patch_size) if early_conv else
                            nn.Conv2d(in_channels, width, patch_size, stride=patch_size, bias=False))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        self.image_pos = nn.Parameter(torch.zeros(1, grid**2 + (pool == "cls"), width))
        self.ln_pre = nn.LayerNorm(width)
        self.token_embed = nn.Embedding(VOCAB, width)
        self.text_pos = nn.Parameter(torch.zeros(1, context_length, width))
        specific = {"image": depth - shared - stem, "text": depth - shared}
        self.specific_blocks = nn.ModuleDict(
            {m: nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(specific[m])) for m in MODALITIES})
        self.shared_blocks = nn.ModuleList(SharedBlock(width, heads, mlp_ratio) for _ in range(shared))
        self.ln_final = nn.ModuleDict({m: nn.LayerNorm(width) for m in MODALITIES})
        self.proj = nn.ModuleDict({m: nn.Linear(width, embed_dim, bias=False) for m in MODALITIES})
        self.adapted_layers = list(range(2, depth, 2))[:5]
        self.branch = (ParallelBranch(in_channels, width, image_size, patch_size, len(self.adapted_layers))
                       if parallel_branch else None)
        # CLIP's initialisation, as in vit and text-transformer; residual projections scaled by the full depth.
        if not early_conv:
            trunc_normal_(self.patch_embed.weight, (in_channels * patch_size**2) ** -0.5)
        for p in (self.image_pos, self.cls_token, self.proj["image"].weight, self.proj["text"].weight):
            if p is not None:
                trunc_normal_(p, width**-0.5)
        trunc_normal_(self.token_embed.weight, 0.02)
        trunc_normal_(self.text_pos, 0.01)
        for m in MODALITIES:
            init_blocks(nn.ModuleList([*self.specific_blocks[m], *self.shared_blocks]), width)
        self.transform = image_transform(image_size, in_channels)

    tokenize = TextTransformer.tokenize  # BOS, UTF-8 bytes, EOS, PAD to context_length

    def forward(self, x: torch.Tensor, *, modality: Literal["image", "text"]) -> torch.Tensor:
        if modality == "image":
            images = stage = x.to(self.image_pos.dtype)  # fp32 pixels into a bf16/fp16 engine
            h = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, width]
            if self.cls_token is not None:
                h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1).to(h.dtype), h], dim=1)
            h = self.ln_pre(h + self.image_pos.to(h.dtype))
        elif modality == "text":
            h = self.token_embed(x) + self.text_pos[:, : x.shape[1]]
        else:
            raise ValueError(f"modality must be 'image' or 'text', not {modality!r}")
        causal = modality == "text"
        blocks = [*self.specific_blocks[modality], *self.shared_blocks]
        first = 1 if modality == "image" and isinstance(self.patch_embed, EarlyConvStem) else 0  # the stem is layer 0
        for layer, block in enumerate(blocks, start=first):
            if modality == "image" and self.branch is not None and layer in self.adapted_layers:
                h, stage = self.branch.fuse(self.adapted_layers.index(layer), h, stage)
            h = block(h, modality, causal=causal) if isinstance(block, SharedBlock) else block(h, causal=causal)
        h = self.ln_final[modality](h)
        if modality == "text":
            h = h[torch.arange(h.shape[0], device=h.device), (x == EOS).int().argmax(dim=1)]
        else:
            h = h[:, 0] if self.pool == "cls" else h.mean(dim=1)
        return self.proj[modality](h)
