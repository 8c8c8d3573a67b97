"""Max-margin image-text ranking loss with the hardest in-batch negative (VSE++, Faghri et al., 2018)."""

import torch
import torch.nn.functional as F
from torch import nn

from orchestrator.distributed import gather_with_grad, rank


class HardestNegativeHinge(nn.Module):
    """VSE++ hinge loss on the hardest negative of each image and each caption, across all ranks."""

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = F.normalize(batch["image"], dim=-1), F.normalize(batch["text"], dim=-1)
        local = image.shape[0]
        all_image, all_text = gather_with_grad(image), gather_with_grad(text)
        positives = torch.arange(local, device=image.device) + local * rank()
        sim_i2t, sim_t2i = image @ all_text.T, text @ all_image.T
        mask = F.one_hot(positives, sim_i2t.shape[1]).bool()
        pos = sim_i2t.gather(1, positives[:, None])
        hardest_text = sim_i2t.masked_fill(mask, -2).max(dim=1).values
        hardest_image = sim_t2i.masked_fill(mask, -2).max(dim=1).values
        loss = (F.relu(self.margin - pos[:, 0] + hardest_text) + F.relu(self.margin - pos[:, 0] + hardest_image)).mean()
        return {"loss": loss}
