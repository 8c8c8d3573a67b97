"""BYOL: predict an EMA target network's projection of another view (Grill et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plugins.losses.heads import cosine_momentum, ema_, frozen_copy, mlp, width
from plugins.losses.views import augment


class BYOL(nn.Module):
    """Bootstrap Your Own Latent: online projector + predictor regress the EMA target's projection.

    Grill et al. 2020, "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning".
    ``p = predictor(projector(encoder(v)))`` (MLPs 4096 hidden with batch norm, 256 out),
    ``z' = projector'(encoder'(v'))`` from the target (the EMA copy made in ``bind``, no gradient), loss
    ``2 - 2 cos(p_1, z'_2) + 2 - 2 cos(p_2, z'_1)`` averaged over the batch. After each step
    ``xi <- tau xi + (1 - tau) theta`` with tau=0.996; ``momentum_steps`` > 0 raises tau to 1 on the
    paper's cosine over that many steps (set it to ``--steps``). Views: SimCLR crops and jitter with
    BYOL's asymmetric blur (p=1.0 and p=0.1) on large images, SimCLR's small-image recipe (colour strength
    0.5, no blur; ``plugins.losses.views``) on images of 64 pixels or less; the solarisation of the second
    view is left out. ``crop_scale``, ``flip`` and ``color`` as ``ntxent``'s.
    Batch norms use the global batch (SyncBN), so the loss is the same for any number of ranks.
    """

    def __init__(self, tau: float = 0.996, momentum_steps: int = 0, hidden: int = 4096, dim: int = 256,
                 crop_scale: tuple[float, float] = (0.08, 1.0), flip: bool = True, color: float | None = None) -> None:
        super().__init__()
        if not 0 <= tau <= 1:
            raise ValueError(f"tau must be in [0, 1], not {tau}")
        self.tau, self.momentum_steps, self.hidden, self.dim = tau, momentum_steps, hidden, dim
        self.views = [augment(crop_scale, 1.0, flip, color, imagenet_blur=p) for p in (1.0, 0.1)]
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def bind(self, encoder: nn.Module) -> None:
        """Build the online heads for the encoder's width and the target copy of encoder and projector."""
        self.__dict__["student"] = encoder
        self.projector = mlp([width(encoder), self.hidden, self.dim])
        self.predictor = mlp([self.dim, self.hidden, self.dim])
        self.teacher = frozen_copy(nn.Sequential(encoder, self.projector))

    def forward(self, batch: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        online = [self.predictor(self.projector(v)) for v in batch["views"]]
        with torch.no_grad():
            target = [self.teacher(x) for x in batch["view_inputs"]]
        dtype = torch.promote_types(online[0].dtype, torch.float32)
        with torch.autocast(online[0].device.type, enabled=False):
            p = [F.normalize(x.to(dtype), dim=-1) for x in online]
            z = [F.normalize(x.to(dtype), dim=-1) for x in target]
            loss = (2 - 2 * (p[0] * z[1]).sum(-1)).mean() + (2 - 2 * (p[1] * z[0]).sum(-1)).mean()
        return {"loss": loss}

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA of the target encoder and projector towards the online ones."""
        tau = cosine_momentum(self.tau, int(self.steps), self.momentum_steps)
        ema_(self.teacher, nn.Sequential(self.student, self.projector), tau)
        self.steps += 1
