"""MoCo v2 and v3: contrast queries with keys from a momentum encoder (He et al. 2020; Chen et al. 2020, 2021)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.distributed import gather, rank
from plugins.losses.heads import cosine_momentum, ema_, frozen_copy, mlp, width
from plugins.losses.views import simclr_views


class MoCo(nn.Module):
    """Momentum contrast: queries from the encoder, keys from its EMA copy; v2 with a queue, v3 in-batch.

    He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning"; Chen et al. 2020,
    "Improved Baselines with Momentum Contrastive Learning" (v2); Chen et al. 2021, "An Empirical Study of
    Training Self-Supervised Vision Transformers" (v3). Two SimCLR views (view options as ``ntxent``'s);
    ``q`` = head(encoder(view)), ``k`` = the same through the momentum copy (``bind``), both L2-normalised,
    updated after each step as ``theta_k <- m theta_k + (1 - m) theta_q`` (``m`` rises to 1 on a cosine
    over ``momentum_steps`` if > 0).

    v2: 2-layer MLP head (2048 hidden, 128 out), ``-log exp(q.k+/T) / (exp(q.k+/T) + sum_queue exp(q.k/T))``
    against a FIFO queue of past keys (random unit vectors at first, as in the official code).
    Both views serve as queries (the symmetrised loss of the v3 paper: the engine encodes both anyway) and
    both keys of every sample of every rank are enqueued, so the queue is the same on all ranks.
    ``queue_size`` is 4096, not the paper's 65536: a queue must hold keys of fewer images than the training
    set, or it holds older keys of the query's own image as negatives. 65536 keys are 5% of ImageNet's
    1.28M images but 16 keys per image of MNIST's 4,000; 4096 (one of the paper's sizes, its Fig. 3) is
    half an MNIST epoch of keys. Use 65536 for ImageNet-sized data.
    v3: 3-layer projector (4096 hidden, 256 out, batch norm on every layer) and a 2-layer predictor on the
    query side, ``2T * CE(q . k_all^T / T, own index)`` against the keys of the other view from every rank
    (gathered, no gradient), symmetric. Batch norms use the global batch (SyncBN).
    ``momentum`` is 0.99 for both: v3's ViT value; v2's paper value, 0.999, leaves 61% of the random
    initialisation in the key encoder after a 500-step run (0.999^500), and its loss stayed near chance
    (8.02 against ln 4097 = 8.32 at step 80 on MNIST); MoCo v1's ablation (Sec. 4.1) has 0.99 within about a
    point of 0.999.
    """

    def __init__(self, version: Literal["v2", "v3"] = "v2", temperature: float = 0.2, momentum: float = 0.99,
                 momentum_steps: int = 0, queue_size: int = 4096, hidden: int | None = None,
                 dim: int | None = None, crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True,
                 color: float | None = None, blur: float | None = None) -> None:
        super().__init__()
        if version not in ("v2", "v3"):
            raise ValueError(f"version must be v2 or v3, not {version!r}")
        if temperature <= 0 or queue_size < 1:
            raise ValueError("temperature and queue_size must be positive")
        self.version, self.temperature, self.momentum_steps = version, temperature, momentum_steps
        self.momentum = momentum
        self.hidden = hidden or {"v2": 2048, "v3": 4096}[version]
        self.dim = dim or {"v2": 128, "v3": 256}[version]
        self.views = simclr_views(2, crop_scale, flip, color, blur)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        if version == "v2":
            self.register_buffer("queue", F.normalize(torch.randn(queue_size, self.dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def bind(self, encoder: nn.Module) -> None:
        """Build the heads for the encoder's width and the momentum copy of encoder and projector."""
        self.__dict__["student"] = encoder
        if self.version == "v2":
            self.projector = mlp([width(encoder), self.hidden, self.dim], bn=False)
        else:
            self.projector = mlp([width(encoder), self.hidden, self.hidden, self.dim], last_bn=True)
            self.predictor = mlp([self.dim, self.hidden, self.dim])
        self.teacher = frozen_copy(nn.Sequential(encoder, self.projector))

    def forward(self, batch: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        queries = [self.projector(v) for v in batch["views"]]
        if self.version == "v3":
            queries = [self.predictor(q) for q in queries]
        with torch.no_grad():
            keys = [self.teacher(x) for x in batch["view_inputs"]]
        dtype = torch.promote_types(queries[0].dtype, torch.float32)
        with torch.autocast(queries[0].device.type, enabled=False):
            q = [F.normalize(x.to(dtype), dim=-1) for x in queries]
            k = [F.normalize(x.to(dtype), dim=-1) for x in keys]
            if self.version == "v2":
                loss = (self._queue_loss(q[0], k[1]) + self._queue_loss(q[1], k[0])) / 2
                self._enqueue(torch.cat([gather(x) for x in k]))
            else:
                loss = self._batch_loss(q[0], k[1]) + self._batch_loss(q[1], k[0])
        return {"loss": loss}

    def _queue_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        positive = (q * k).sum(dim=-1, keepdim=True)
        negative = q @ self.queue.to(q.dtype).T.clone()  # a copy: the queue changes before backward
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))

    def _batch_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        labels = torch.arange(len(q), device=q.device) + len(q) * rank()
        return F.cross_entropy(q @ gather(k).T / self.temperature, labels) * 2 * self.temperature

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Write ``keys`` over the oldest entries (a ring, as in the official code), in order."""
        size = len(self.queue)
        keys = keys[-size:]
        index = (self.queue_ptr + torch.arange(len(keys), device=keys.device)) % size
        self.queue[index] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % size)

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA of the momentum encoder and projector towards the online ones."""
        momentum = cosine_momentum(self.momentum, int(self.steps), self.momentum_steps)
        ema_(self.teacher, nn.Sequential(self.student, self.projector), momentum)
        self.steps += 1
