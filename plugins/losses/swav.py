"""SwAV: swapped prediction of online cluster codes across multi-crop views (Caron et al. 2020)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orchestrator.distributed import gather, is_distributed, world_size
from plugins.losses.heads import mlp, width
from plugins.losses.views import multicrop_views


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(x)
    return x


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int, shared: int = 0) -> torch.Tensor:
    """Equipartitioned soft codes ``[N, K]`` for prototype scores ``[N, K]`` over the GLOBAL batch.

    Sinkhorn-Knopp on ``exp(scores / epsilon)`` as in the official ``distributed_sinkhorn``: the row (per
    prototype) and total sums are all-reduced over ranks. The first ``shared`` rows (the queue) are the
    same on every rank and count once. Returns the codes of the other rows, each summing to 1.
    """
    q = torch.exp(scores / epsilon).T
    weight = torch.ones(q.shape[1], dtype=q.dtype, device=q.device)
    weight[:shared] = 1 / world_size()
    prototypes, samples = q.shape[0], shared + (q.shape[1] - shared) * world_size()
    q /= _all_sum((q * weight).sum())
    for _ in range(iterations):
        q /= _all_sum((q * weight).sum(dim=1, keepdim=True))
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= samples
    return (q * samples).T[shared:]


class SwAV(nn.Module):
    """Swapping Assignments between Views: each crop predicts the Sinkhorn codes of the global crops.

    Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments".
    ``z = normalise(projector(encoder(v)))`` (2-layer MLP, 2048 hidden with batch norm, 128 out), scores
    ``z . c_k`` against learnable unit-norm prototypes (re-normalised after each step). Codes ``q`` of
    each global crop: 3 Sinkhorn-Knopp iterations, epsilon 0.05, over the global batch (plus the queue of
    past global-crop embeddings once it is full, if ``queue_size`` > 0). Loss: the mean over global crops
    ``i`` and other crops ``v`` of ``-sum_k q_i^(k) log softmax(z_v . c / T)^(k)``, T=0.1. The prototypes
    take no gradient for the first ``freeze_prototypes_steps`` (the official 313).
    Multi-crop with SwAV's scales: ``global_crops`` at (0.14, 1) and ``local_crops`` at (0.05, 0.14); 2 local
    crops, not the paper's 6: the encoder's transform resizes a local crop to its input size, so each costs
    a whole forward here (a 96-pixel crop costs a fifth of a 224 one in the paper), and 2 + 2 crops keep a
    step at twice the cost of two views on a laptop CPU. ``flip=false`` leaves out the horizontal flip.
    ``prototypes`` is 30, not 3000: the paper uses 3 prototypes per ImageNet class and about 10 per sample
    of its 4096 batch; MNIST has 10 classes and the equipartition of a 128 batch over 3000 prototypes would
    give each fewer than 0.05 samples. Batch norms use the global batch (SyncBN); the queue is gathered
    from all ranks, so it is identical on each.
    """

    def __init__(self, prototypes: int = 30, temperature: float = 0.1, epsilon: float = 0.05,
                 sinkhorn_iterations: int = 3, global_crops: int = 2, local_crops: int = 2, queue_size: int = 0,
                 freeze_prototypes_steps: int = 313, hidden: int = 2048, dim: int = 128, flip: bool = True) -> None:
        super().__init__()
        if prototypes < 1 or temperature <= 0 or epsilon <= 0 or queue_size < 0:
            raise ValueError("prototypes, temperature and epsilon must be positive, queue_size non-negative")
        self.temperature, self.epsilon, self.iterations = temperature, epsilon, sinkhorn_iterations
        self.global_crops, self.freeze_steps, self.hidden, self.dim = global_crops, freeze_prototypes_steps, hidden, dim
        self.views = multicrop_views(global_crops, local_crops, global_scale=(0.14, 1.0), local_scale=(0.05, 0.14),
                                     flip=flip)
        self.prototypes = nn.Linear(dim, prototypes, bias=False)
        self.normalize_prototypes()
        self.register_buffer("queue", torch.zeros(global_crops, queue_size, dim))
        self.register_buffer("queued", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def bind(self, encoder: nn.Module) -> None:
        """Build the projection head for the encoder's width."""
        self.projector = mlp([width(encoder), self.hidden, self.dim])

    def forward(self, batch: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        embeddings = [self.projector(v) for v in batch["views"]]
        prototypes = self.prototypes.weight
        if self.steps < self.freeze_steps:
            prototypes = prototypes.detach()
        dtype = torch.promote_types(embeddings[0].dtype, torch.float32)
        with torch.autocast(embeddings[0].device.type, enabled=False):
            z = [F.normalize(x.to(dtype), dim=-1) for x in embeddings]
            c = prototypes.to(dtype)
            scores = [x @ c.T for x in z]
            use_queue = self.queue.shape[1] > 0 and self.queued >= self.queue.shape[1]
            loss = scores[0].new_zeros(())
            for i in range(self.global_crops):
                queued = self.queue[i].to(dtype) @ c.detach().T if use_queue else scores[i][:0]
                codes = sinkhorn(torch.cat([queued, scores[i].detach()]), self.epsilon, self.iterations, len(queued))
                loss = loss - sum((codes * F.log_softmax(s / self.temperature, dim=-1)).sum(-1).mean()
                                  for v, s in enumerate(scores) if v != i) / (len(scores) - 1)
            if self.queue.shape[1] > 0:
                self._enqueue([gather(x.detach()) for x in z[:self.global_crops]])
        return {"loss": loss / self.global_crops}

    @torch.no_grad()
    def _enqueue(self, embeddings: list[torch.Tensor]) -> None:
        """Newest first, shifting the oldest out (the official code's order)."""
        size = self.queue.shape[1]
        for i, x in enumerate(embeddings):
            self.queue[i] = torch.cat([x.to(self.queue.dtype), self.queue[i][:max(size - len(x), 0)]])[:size]
        self.queued.copy_(torch.clamp(self.queued + len(embeddings[0]), max=size))

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    @torch.no_grad()
    def after_step(self) -> None:
        """Re-normalise the prototypes and count the step."""
        self.normalize_prototypes()
        self.steps += 1
