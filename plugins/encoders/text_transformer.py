"""The CLIP text tower (Radford et al. 2021), small, on a byte-level tokenizer that needs no download."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from plugins.encoders.checkpointing import run_block
from plugins.encoders.heads import make_head
from plugins.encoders.options import nested_dims as checked_nested_dims
from plugins.encoders.vit import Block, init_blocks, trunc_normal_

PAD, BOS, EOS = 256, 257, 258  # token ids 0..255 are the UTF-8 bytes
VOCAB = 259


class TextTransformer(nn.Module):
    """A small CLIP-style text transformer over UTF-8 bytes (no vocabulary file, no download).

    Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision": token
    and learned position embeddings, pre-LN blocks, a final LayerNorm and a bias-free projection.
    ``pool="eot"`` is CLIP's choice (causal mask, the features at the end-of-text token);
    ``pool="mean"`` attends both ways and averages the non-padding tokens. A caption is ``BOS``, its
    bytes, ``EOS``, then padding to ``context_length``; longer captions are truncated before ``EOS``.
    ``head``, ``head_layers``, ``head_hidden``, ``head_norm``: the projection head (``plugins.encoders.heads``;
    the default is CLIP's bias-free linear map). ``nested_dims``: Matryoshka widths (Kusupati et al. 2022).
    """

    def __init__(
        self,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        context_length: int = 32,
        embed_dim: int = 128,
        pool: Literal["eot", "mean"] = "eot",
        head: Literal["linear", "mlp", "none"] = "linear",
        head_layers: int = 2,
        head_hidden: int | None = None,
        head_norm: Literal["batch", "layer", "none"] = "batch",
        nested_dims: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if context_length < 2:
            raise ValueError("context_length must leave room for BOS and EOS")
        if pool not in ("eot", "mean"):
            raise ValueError(f"pool must be 'eot' or 'mean', not {pool!r}")
        self.embed_dim, self.context_length, self.pool = embed_dim, context_length, pool
        self.nested_dims = checked_nested_dims(nested_dims, embed_dim)
        self.grad_checkpointing = False
        self.token_embed = nn.Embedding(VOCAB, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)
        self.proj = make_head(head, width, embed_dim, head_layers, head_hidden, head_norm)
        trunc_normal_(self.token_embed.weight, 0.02)  # CLIP
        trunc_normal_(self.pos_embed, 0.01)
        if head == "linear":
            trunc_normal_(self.proj.weight, width**-0.5)
        init_blocks(self.blocks, width)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward pass (``plugins.encoders.checkpointing``)."""
        self.grad_checkpointing = enabled

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """``[len(texts), context_length]`` token ids: BOS, UTF-8 bytes (truncated), EOS, PAD..."""
        out = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [BOS, *text.encode("utf-8")[: self.context_length - 2], EOS]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    @staticmethod
    def decode(tokens: torch.Tensor) -> list[str]:
        """The captions back from token ids (a multi-byte character cut by truncation is dropped)."""
        return [bytes(t for t in row if t < 256).decode("utf-8", errors="ignore") for row in tokens.tolist()]

    def _trunk(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, width]`` features after the final LayerNorm, and the ``[B, T]`` mask of non-PAD tokens."""
        x = self.token_embed(tokens) + self.pos_embed[:, : tokens.shape[1]]
        keep = tokens != PAD
        mask = None if self.pool == "eot" else keep[:, None, None, :]  # [B, 1, 1, T]: attend to non-PAD
        for block in self.blocks:
            x = run_block(block, self.grad_checkpointing, x, mask=mask, causal=self.pool == "eot")
        return self.ln_final(x), keep

    def forward_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected token features ``[B, T, embed_dim]`` (FILIP: Yao et al. 2022) and the non-PAD mask."""
        x, keep = self._trunk(tokens)
        return self.proj(x), keep

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, keep = self._trunk(tokens)
        if self.pool == "eot":
            x = x[torch.arange(x.shape[0], device=x.device), (tokens == EOS).int().argmax(dim=1)]
        else:
            w = keep.unsqueeze(-1).to(x.dtype)
            x = (x * w).sum(dim=1) / w.sum(dim=1)
        return self.proj(x)
