"""Row tiles of an image-text similarity matrix, so a loss never holds all of it (Inf-CL).

Cheng et al. 2024, "Breaking the Memory Barrier: Near Infinite Batch Size Scaling for Contrastive Loss":
the memory of a contrastive loss over B x N similarities is the similarity matrix itself (and its softmax,
and the softmax's gradient), quadratic in the batch, while everything else is linear. Losses whose terms
reduce each row of the matrix on its own (InfoNCE's and FILIP's log-sum-exp, SigLIP's sum of sigmoid terms,
soft-infonce's row of soft targets against a row of log-probabilities) can score ``tile`` rows at a time:
each tile is checkpointed, so the forward pass keeps only one reduced value per row and the backward pass
recomputes one tile at a time. The result and the gradients are those of the whole matrix; the price is one
more matrix product per tile. Inf-CL also tiles the columns and passes the gathered embeddings around a
ring; tiling the rows is what takes the memory from B x N to tile x N.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def reduce_rows(reduce: Callable[..., torch.Tensor], tile: int, *rows: torch.Tensor) -> torch.Tensor:
    """``reduce(*rows)``, one value per row, computed ``tile`` rows at a time when ``0 < tile < n`` rows.

    ``rows`` are tensors with one row per sample (the embeddings, their token masks); ``reduce`` builds those
    rows' similarities and reduces each row. The tensors it closes over (the other modality's embeddings, the
    scale) get their gradients as usual.
    """
    n = rows[0].shape[0]
    if tile <= 0 or tile >= n:
        return reduce(*rows)
    return torch.cat([checkpoint(reduce, *(r[start:start + tile] for r in rows), use_reentrant=False)
                      for start in range(0, n, tile)])
