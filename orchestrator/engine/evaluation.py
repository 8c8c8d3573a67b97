"""What evaluators receive: the trained encoders and batched, normalised encode helpers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, default_collate

from orchestrator.data import loader_workers
from orchestrator.errors import UserError

# what an evaluator reads of an image encoder: its output, its representation before the projection head, or
# ``auto``: the representation when the encoder has one (the protocol of SimCLR, DINO and CLIP's linear probes)
Representation = Literal["auto", "embedding", "backbone"]


class SplitImages(Sequence[torch.Tensor]):
    """The images of ``split`` (of its samples ``indices``, when given), each decoded only when read; a slice is
    another such view. Give it to ``EvalContext.encode_images`` so that one batch of images is held at a time, not
    the split: a kNN bank is the whole train split, and a million images of 224 px are 600 GB as floats."""

    def __init__(self, split: Any, indices: range | None = None) -> None:
        self.split, self.indices = split, range(len(split)) if indices is None else indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return SplitImages(self.split, self.indices[i])
        return self.split[self.indices[i]]["image"]


def _transformed(images: Iterable[torch.Tensor], transform: Callable) -> torch.Tensor:
    return default_collate([transform(image) for image in images])  # in a loader worker: into shared memory


class EvalInterrupted(Exception):
    """The run was asked to stop during an evaluation: the engine saves the step and evaluates it on resume."""


def _never() -> bool:
    return False


@dataclass
class EvalContext:
    image_encoder: nn.Module
    text_encoder: nn.Module | None  # the same module as image_encoder when one tower is shared
    dataset: Any
    device: torch.device
    dtype: torch.dtype = torch.float32
    batch_size: int = 256
    stop_asked: Callable[[], bool] = _never  # checked before each batch: a preemption need not wait for the end
    workers: int = 0  # loader processes decoding a split's images (``--workers``); 0: this process decodes them

    def _check(self) -> None:
        if self.stop_asked():
            raise EvalInterrupted("asked to stop during the evaluation")

    @property
    def shared(self) -> bool:
        return self.text_encoder is self.image_encoder

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def resolve(self, representation: Representation) -> Literal["embedding", "backbone"]:
        """``auto`` is ``backbone`` when the image encoder has a ``representation(images)`` method."""
        if representation != "auto":
            return representation
        return "backbone" if callable(getattr(self.image_encoder, "representation", None)) else "embedding"

    @torch.no_grad()
    def encode_images(self, images: Sequence[torch.Tensor] | torch.Tensor,
                      representation: Representation = "embedding") -> torch.Tensor:
        """L2-normalised embeddings of raw image tensors (each C x H x W in [0, 1]), in float32, encoded in
        batches: ``SplitImages(split)`` decodes one batch at a time. ``representation="backbone"``: the encoder's
        ``representation`` before its projection head instead."""
        transform = self.image_encoder.transform
        encode = self.image_encoder
        if self.resolve(representation) == "backbone":
            encode = getattr(self.image_encoder, "representation", None)
            if not callable(encode):
                raise UserError(f"representation=backbone: the image encoder {type(self.image_encoder).__name__} has "
                                f"no representation(images) method; use representation=embedding")
        out = []
        for batch in self._image_batches(images, transform):
            self._check()
            with self._autocast():
                kwargs = {"modality": "image"} if self.shared else {}
                out.append(encode(batch.to(self.device), **kwargs).float())
        return F.normalize(torch.cat(out), dim=-1)

    def _image_batches(self, images: Sequence[torch.Tensor] | torch.Tensor,
                       transform: Callable) -> Iterator[torch.Tensor]:
        """Transformed batches of ``images`` in order: a split's (``SplitImages``) decoded by ``workers`` loader
        processes when there are any, as training's are (one process decodes 256 px JPEGs at a few hundred a
        second: hours for a bank of millions), else here."""
        if isinstance(images, SplitImages) and self.workers:
            yield from DataLoader(images, batch_size=self.batch_size, **loader_workers(self.workers),
                                  collate_fn=partial(_transformed, transform=transform))
            return
        for start in range(0, len(images), self.batch_size):
            yield _transformed(images[start:start + self.batch_size], transform)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised embeddings of captions, in float32."""
        if self.text_encoder is None:
            raise RuntimeError("this run has no text tower")
        out = []
        for start in range(0, len(texts), self.batch_size):
            self._check()
            tokens = self.text_encoder.tokenize(list(texts[start:start + self.batch_size]))
            with self._autocast():
                kwargs = {"modality": "text"} if self.shared else {}
                out.append(self.text_encoder(tokens.to(self.device), **kwargs).float())
        return F.normalize(torch.cat(out), dim=-1)

    def encode_split(self, split: Any, representation: Representation = "embedding",
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (or backbone representations) and labels of every sample of a labelled split, decoded one
        batch at a time."""
        return self.encode_images(SplitImages(split), representation), torch.as_tensor(split.labels)
