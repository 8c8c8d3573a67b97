"""Nearest-class-centroid accuracy on frozen image features: a probe with no training and no text tower."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orchestrator.engine.evaluation import EvalContext


class NearestCentroid:
    """Nearest-class-centroid top-1 accuracy (%) of the held-out split, centroids from the train split.

    Each class is the re-normalised mean of the L2-normalised image features of its training samples;
    a held-out image gets the class of the most similar centroid (cosine similarity).
    """

    def __init__(self, max_train: int = 10_000) -> None:
        self.max_train = max_train

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        train, test = ctx.dataset.train, ctx.dataset.test
        keep = list(range(min(len(train), self.max_train)))
        train_features = ctx.encode_images([train[i]["image"] for i in keep])
        train_labels = torch.as_tensor([train.labels[i] for i in keep])
        classes = len(ctx.dataset.class_names)
        sums = torch.zeros(classes, train_features.shape[1]).index_add_(0, train_labels, train_features.cpu())
        centroids = F.normalize(sums, dim=-1)
        features, labels = ctx.encode_split(test)
        predicted = (features.cpu() @ centroids.T).argmax(dim=-1)
        return {"top1": 100.0 * (predicted == labels).float().mean().item()}
