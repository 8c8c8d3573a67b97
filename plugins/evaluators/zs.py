"""Zero-shot classification with a prompt-ensemble classifier (CLIP: Radford et al. 2021, section 3.1.4).

Each class is represented by the mean of the L2-normalised text embeddings of its name in every prompt
template, re-normalised; an image is assigned the class with the highest cosine similarity
(logits = 100 * image @ classifier.T, CLIP's logit scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from orchestrator.engine.evaluation import EvalContext

LOGIT_SCALE = 100.0
ENSEMBLE = "mean of L2-normalised template embeddings, re-normalised (CLIP)"


def zero_shot_classifier(ctx: EvalContext, class_names: Sequence[str],
                         templates: Sequence[str]) -> torch.Tensor:
    """``[classes, dim]`` unit-norm class embeddings: per class, the re-normalised mean over templates."""
    texts = [template.format(name) for name in class_names for template in templates]
    embeddings = ctx.encode_texts(texts)  # already L2-normalised per caption
    per_class = embeddings.reshape(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def topk_accuracy(image_features: torch.Tensor, classifier: torch.Tensor,
                  labels: torch.Tensor) -> dict[str, float]:
    """top1 (and top5 when there are more than 5 classes) in percent, from unit-norm features."""
    logits = LOGIT_SCALE * image_features @ classifier.to(image_features.device).T
    labels = labels.to(logits.device)
    ks = (1, 5) if classifier.shape[0] > 5 else (1,)
    ranked = logits.topk(max(ks), dim=-1).indices
    hits = ranked == labels[:, None]
    return {f"top{k}": 100.0 * hits[:, :k].any(dim=-1).sum().item() / len(labels) for k in ks}


class ZeroShot:
    """Zero-shot top-1/top-5 accuracy on the dataset's held-out split, with CLIP's prompt ensemble.

    The class names and prompt templates are the dataset's (``class_names``, ``templates``).
    ``split`` picks the split to classify: ``test`` (held out; the default) or ``train``.
    """

    def __init__(self, split: Literal["test", "train"] = "test"):
        self.split = split
        self._seen: dict[str, Any] = {}

    def protocol(self) -> dict[str, Any]:
        """How the numbers were obtained (sample and template counts once ``evaluate`` has run)."""
        return {"evaluator": "zero-shot classification (Radford et al. 2021)", "split": self.split,
                "ensemble": ENSEMBLE, "logit_scale": LOGIT_SCALE, **self._seen}

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        dataset = ctx.dataset
        split = getattr(dataset, self.split)
        classifier = zero_shot_classifier(ctx, dataset.class_names, dataset.templates)
        features, labels = ctx.encode_split(split)
        self._seen = {"samples": len(split), "classes": len(dataset.class_names),
                      "templates": len(dataset.templates)}
        return topk_accuracy(features, classifier, labels)
