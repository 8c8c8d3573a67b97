"""DINO: self-distillation with no labels, a student matching a centred, sharpened EMA teacher (Caron et al. 2021)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from orchestrator.distributed import is_distributed, world_size
from plugins.losses.heads import cosine_momentum, ema_, frozen_copy, mlp, width
from plugins.losses.views import multicrop_views


class DINOHead(nn.Module):
    """DINO's head: 3-layer MLP (GELU; batch norm after the hidden layers if ``bn``) to a bottleneck, L2
    norm, then a weight-normalised linear layer with its norm fixed at 1 (``norm_last_layer=True``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 2048, bottleneck: int = 256,
                 bn: bool = False) -> None:
        super().__init__()
        self.mlp = mlp([in_dim, hidden, hidden, bottleneck], bn=bn, act=nn.GELU)
        self.last_layer = nn.Parameter(nn.Linear(bottleneck, out_dim, bias=False).weight.detach())

    def forward(self, x: torch.Tensor, freeze_last_layer: bool = False) -> torch.Tensor:
        last = self.last_layer.detach() if freeze_last_layer else self.last_layer
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(last, dim=1).T


class DINO(nn.Module):
    """Self-distillation: cross-entropy between the teacher's centred, sharpened outputs and the student's.

    Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers". The student is the
    encoder plus a DINO head; the teacher (``bind``) an EMA copy of both, updated after each step with
    momentum 0.996 (rising to 1 on a cosine over ``momentum_steps`` if > 0). Multi-crop: ``global_crops``
    at (0.4, 1) and ``local_crops`` at (0.05, 0.4); the teacher sees the global crops only. Loss: the mean
    over pairs of a global crop ``g`` and a different crop ``v`` of ``-sum P_t(g) log P_s(v)``, with
    ``P_s = softmax(g_s / 0.1)`` and ``P_t = softmax((g_t - c) / T_t)``; ``T_t`` goes linearly from
    ``warmup_teacher_temp`` to ``teacher_temp`` (0.04) over ``warmup_teacher_temp_steps``. The centre ``c``
    (a buffer) follows the global batch mean of the teacher outputs (all-reduced) with momentum 0.9.
    ``out_dim`` is 4096, not the paper's 65536 (sized for ImageNet): a 65536-way last layer alone would cost
    20 times the 0.8M parameters of the default MNIST ViT. ``local_crops`` is 2, not the paper's 8: the
    encoder's transform resizes a local crop to its input size, so each costs a whole forward here (a
    96-pixel crop costs a fifth of a 224 one in the paper), and 2 + 2 crops keep a step at twice the cost of
    two views on a laptop CPU. ``flip=false`` leaves out the horizontal flip (mirrored digits are not
    digits). ``freeze_last_layer_steps`` keeps the last layer out of training for that many steps (the
    official code freezes it for the first epoch, ``freeze_last_layer=1``, "to stabilise training").
    ``bn`` puts batch norm (over the global batch) in the head's MLP, the official ``use_bn_in_head``.
    """

    def __init__(self, out_dim: int = 4096, hidden: int = 2048, bottleneck: int = 256, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04, warmup_teacher_temp_steps: int = 0,
                 center_momentum: float = 0.9, momentum: float = 0.996, momentum_steps: int = 0,
                 global_crops: int = 2, local_crops: int = 2, flip: bool = True,
                 freeze_last_layer_steps: int = 0, bn: bool = False) -> None:
        super().__init__()
        if min(student_temp, teacher_temp, warmup_teacher_temp) <= 0 or global_crops < 1:
            raise ValueError("temperatures must be positive and there must be at least one global crop")
        self.out_dim, self.hidden, self.bottleneck = out_dim, hidden, bottleneck
        self.student_temp, self.teacher_temp, self.global_crops = student_temp, teacher_temp, global_crops
        self.warmup_teacher_temp, self.warmup_steps = warmup_teacher_temp, warmup_teacher_temp_steps
        self.center_momentum, self.momentum, self.momentum_steps = center_momentum, momentum, momentum_steps
        self.freeze_last_layer_steps, self.bn = freeze_last_layer_steps, bn
        self.views = multicrop_views(global_crops, local_crops, flip=flip)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def bind(self, encoder: nn.Module) -> None:
        """Build the student head for the encoder's width and the teacher copy of encoder and head."""
        self.__dict__["student"] = encoder
        self.head = DINOHead(width(encoder), self.out_dim, self.hidden, self.bottleneck, self.bn)
        self.teacher = frozen_copy(nn.Sequential(encoder, self.head))

    def teacher_temperature(self) -> float:
        step = int(self.steps)
        if step >= self.warmup_steps:
            return self.teacher_temp
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * step / self.warmup_steps

    def forward(self, batch: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        frozen = int(self.steps) < self.freeze_last_layer_steps
        student = [self.head(v, freeze_last_layer=frozen) for v in batch["views"]]
        with torch.no_grad():
            teacher = [self.teacher(x) for x in batch["view_inputs"][:self.global_crops]]
        dtype = torch.promote_types(student[0].dtype, torch.float32)
        with torch.autocast(student[0].device.type, enabled=False):
            teacher = [t.to(dtype) for t in teacher]
            targets = [F.softmax((t - self.center.to(dtype)) / self.teacher_temperature(), dim=-1) for t in teacher]
            logs = [F.log_softmax(s.to(dtype) / self.student_temp, dim=-1) for s in student]
            terms = [-(p * logs[v]).sum(-1).mean() for g, p in enumerate(targets) for v in range(len(logs)) if v != g]
            loss = sum(terms) / len(terms)
            self._update_center(torch.cat(teacher))
        return {"loss": loss}

    @torch.no_grad()
    def _update_center(self, teacher: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean(teacher outputs)``, the mean over the global batch (all-reduced)."""
        total = teacher.sum(dim=0, keepdim=True)
        if is_distributed():
            dist.all_reduce(total)
        mean = total / (len(teacher) * world_size())
        self.center.mul_(self.center_momentum).add_(mean.to(self.center.dtype), alpha=1 - self.center_momentum)

    @torch.no_grad()
    def after_step(self) -> None:
        """EMA of the teacher encoder and head towards the student's."""
        momentum = cosine_momentum(self.momentum, int(self.steps), self.momentum_steps)
        ema_(self.teacher, nn.Sequential(self.student, self.head), momentum)
        self.steps += 1
