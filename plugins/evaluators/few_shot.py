"""Few-shot linear probe: logistic regression on n labelled examples per class (CLIP: Radford et al. 2021,
section 3.1.5 and Figure 6, 1/2/4/8/16 shots; the k-shot protocol of CoOp, Zhou et al. 2022).

For each number of shots n and each of ``seeds`` draws, n train examples of every class are drawn at
random, a logistic-regression probe (the linear probe's classifier: scikit-learn, L-BFGS, L2) is fit on
their frozen features and scored on the whole held-out test split; the mean and standard deviation
over the draws are reported.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from orchestrator.engine.evaluation import EvalContext
from orchestrator.errors import UserError
from plugins.evaluators.knn import vote_accuracy
from plugins.evaluators.linear_probe import class_count, fit_logistic, probe_scores, to_numpy


def draw_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """``shots`` indices of each class drawn without replacement (all of a smaller class), seeded by (seed, shots)."""
    rng = np.random.default_rng([seed, shots])
    picked = [rng.choice(np.flatnonzero(labels == c), min(shots, int((labels == c).sum())), replace=False)
              for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


class FewShot:
    """n-shot logistic-regression probe on frozen features, mean and std over random draws (CLIP, CoOp).

    ``shots``: the numbers of train examples per class (CLIP: 1, 2, 4, 8, 16). ``seeds``: draws per n.
    ``C``: the probe's inverse L2 strength, fixed (n-shot leaves no validation data to choose it; a
    strong penalty keeps a 1-shot probe near the nearest-class-mean classifier). Metrics:
    ``top1_<n>shot`` and ``top1_<n>shot_std`` (population std over the draws). ``representation=backbone``
    probes the representation before the projection head; ``auto`` (the default) does so when the encoder
    has one; ``embedding``: its output.
    """

    def __init__(self, shots: tuple[int, ...] = (1, 2, 4, 8, 16), seeds: int = 3, C: float = 1.0,
                 max_iter: int = 1000, representation: Literal["auto", "embedding", "backbone"] = "auto") -> None:
        if not shots or min(shots) < 1 or seeds < 1 or C <= 0:
            raise UserError(f"few-shot needs shots >= 1, seeds >= 1 and C > 0, got {shots}, {seeds}, {C}")
        self.shots = tuple(shots)
        self.seeds = seeds
        self.C = C
        self.max_iter = max_iter
        self.representation = representation
        self._seen: dict[str, Any] = {}

    def protocol(self) -> dict[str, Any]:
        """Shots, draws, C, the classifier and the split sizes."""
        return {"evaluator": "few-shot linear probe (Radford et al. 2021; Zhou et al. 2022)",
                "classifier": "scikit-learn LogisticRegression, L-BFGS, L2, multinomial", "C": self.C,
                "max_iter": self.max_iter, "representation": self.representation, "shots": list(self.shots),
                "seeds": self.seeds,
                "draw": "n train examples per class without replacement, numpy default_rng([seed, n])",
                "std": "population std over the draws", "train_split": "train", "eval_split": "test",
                **self._seen}

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        dataset = ctx.dataset
        representation = ctx.resolve(self.representation)
        x_train, y_train = to_numpy(*ctx.encode_split(dataset.train, representation))
        x_test, y_test = to_numpy(*ctx.encode_split(dataset.test, representation))
        classes = class_count(dataset, y_train, y_test)
        metrics: dict[str, float] = {}
        for n in self.shots:
            top1 = []
            for seed in range(self.seeds):
                picked = draw_shots(y_train, n, seed)
                model = fit_logistic(x_train[picked], y_train[picked], self.C, self.max_iter)
                scores = probe_scores(model, x_test, classes)
                top1.append(vote_accuracy(scores, torch.as_tensor(y_test))["top1"])
            metrics[f"top1_{n}shot"] = float(np.mean(top1))
            metrics[f"top1_{n}shot_std"] = float(np.std(top1))
        self._seen = {"representation": representation,
                      "train_pool": len(y_train), "test_samples": len(y_test), "classes": classes}
        return metrics
