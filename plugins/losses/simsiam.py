"""SimSiam: a predictor matches the stop-gradient projection of another view (Chen & He 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from plugins.losses.heads import mlp, width
from plugins.losses.views import simclr_views


class SimSiam(nn.Module):
    """Simple Siamese learning: negative cosine between a predicted and a stop-gradient projection.

    Chen & He 2021, "Exploring Simple Siamese Representation Learning". ``z = projector(encoder(v))``
    (3 layers of ``dim`` with batch norm, the last without affine parameters), ``p = predictor(z)`` (a
    bottleneck MLP ``dim -> pred_dim -> dim``), loss ``-(cos(p_1, sg(z_2)) + cos(p_2, sg(z_1))) / 2``.
    ``fix_pred_lr`` (the official code's ``--fix-pred-lr``, the paper's Sec. 4.1: 68.1% against 67.7% with a
    decayed predictor) keeps the predictor at the base learning rate throughout, while the rest follows the
    run's schedule. No teacher: ``bind`` only sizes the heads for the encoder. Batch norms use the global
    batch (SyncBN). ``std`` logs the per-dimension std of the normalised projections over this rank's batch
    (the paper's collapse monitor: about ``dim^-1/2`` when healthy, 0 when collapsed). Views: SimCLR's
    augmentation (``plugins.losses.views``), its options as ``ntxent``'s.
    """

    def __init__(self, dim: int = 2048, pred_dim: int = 512, crop_scale: tuple[float, float] = (0.08, 1.0),
                 flip: bool = True, color: float | None = None, blur: float | None = None,
                 fix_pred_lr: bool = True) -> None:
        super().__init__()
        self.dim, self.pred_dim, self.fix_pred_lr = dim, pred_dim, fix_pred_lr
        self.views = simclr_views(2, crop_scale, flip, color, blur)

    def bind(self, encoder: nn.Module) -> None:
        """Build the projector and predictor for the encoder's width."""
        self.projector = mlp([width(encoder), self.dim, self.dim, self.dim], last_bn=True)
        self.predictor = mlp([self.dim, self.pred_dim, self.dim])

    def fixed_lr_parameters(self) -> list[nn.Parameter]:
        """What the engine keeps at the base learning rate: the predictor, with ``fix_pred_lr``."""
        return list(self.predictor.parameters()) if self.fix_pred_lr else []

    def forward(self, batch: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        projections = [self.projector(v) for v in batch["views"]]
        predictions = [self.predictor(z) for z in projections]
        dtype = torch.promote_types(projections[0].dtype, torch.float32)
        with torch.autocast(projections[0].device.type, enabled=False):
            z = [F.normalize(x.detach().to(dtype), dim=-1) for x in projections]
            p = [F.normalize(x.to(dtype), dim=-1) for x in predictions]
            loss = -((p[0] * z[1]).sum(-1).mean() + (p[1] * z[0]).sum(-1).mean()) / 2
        return {"loss": loss, "std": z[0].std(dim=0).mean()}
