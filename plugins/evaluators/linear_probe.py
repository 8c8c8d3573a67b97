"""Linear probe: L2-regularised logistic regression on frozen features (CLIP: Radford et al. 2021, appendix A.3).

CLIP's protocol: scikit-learn's L-BFGS logistic regression (max 1,000 iterations) on the frozen image
features; the regularisation strength is chosen on a validation split over 1e-6..1e6 by a "parametric
binary search" that starts from the values 10^-6, 10^-4, ..., 10^6 and repeatedly halves the interval
around the best value until it reaches 8 steps per decade; the classifier is then refit on train + val
and scored on the test split. Here the searched value is scikit-learn's ``C`` (the inverse strength).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

from orchestrator.data import held_out
from orchestrator.engine.evaluation import EvalContext
from orchestrator.errors import UserError
from plugins.evaluators.knn import vote_accuracy

COARSE = (-6.0, 6.0, 2.0)  # log10 C: first, last, step of CLIP's starting grid


def fit_logistic(features: np.ndarray, labels: np.ndarray, C: float, max_iter: int = 1000) -> Any:
    """scikit-learn's multinomial, L2-penalised logistic regression (L-BFGS), as CLIP fits its probes."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():  # a weakly regularised probe on separable data may stop at max_iter
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=C, max_iter=max_iter, solver="lbfgs").fit(features, labels)


def probe_scores(model: Any, features: np.ndarray, classes: int) -> torch.Tensor:
    """``[M, classes]`` class probabilities; a class absent from the training labels gets -1."""
    scores = torch.full((len(features), classes), -1.0, dtype=torch.float64)
    scores[:, torch.as_tensor(model.classes_)] = torch.as_tensor(model.predict_proba(features))
    return scores


def binary_search_log_c(score: Callable[[float], float], refinements: int) -> tuple[float, dict[float, float]]:
    """CLIP's parametric binary search over log10 C: the coarse grid, then ``refinements`` halvings.

    Each halving scores the two neighbours of the current best at half the previous step (8 steps per
    decade after 4). Among equally good values the middle one of the best (in log C) is taken, so a
    plateau of perfect scores does not push C to an extreme. Returns (best log10 C, every log10 C tried
    with its score).
    """
    first, last, step = COARSE
    tried: dict[float, float] = {}

    def visit(exponent: float) -> None:
        exponent = round(exponent, 6)
        if first <= exponent <= last and exponent not in tried:
            tried[exponent] = score(10.0 ** exponent)

    def best() -> float:
        top = max(tried.values())
        winners = sorted(e for e, s in tried.items() if s == top)
        return winners[(len(winners) - 1) // 2]

    for exponent in np.arange(first, last + step / 2, step):
        visit(float(exponent))
    for _ in range(refinements):
        step /= 2
        centre = best()
        visit(centre - step)
        visit(centre + step)
    return best(), dict(sorted(tried.items()))


def to_numpy(features: torch.Tensor, labels: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return features.double().cpu().numpy(), labels.cpu().numpy()


def class_count(dataset: Any, *label_sets: np.ndarray) -> int:
    """The number of classes: the dataset's ``class_names`` or else the largest label + 1."""
    names = getattr(dataset, "class_names", None)
    return len(names) if names else int(max(labels.max() for labels in label_sets)) + 1


class LinearProbe:
    """Logistic-regression probe on frozen image features, C chosen on a validation split (CLIP, A.3).

    ``val_fraction`` of each class of the train split (its last samples, fixed) is the validation split
    for the C search; ``refinements`` halvings of CLIP's binary search follow the coarse grid
    10^-6, 10^-4, ..., 10^6 (4: CLIP's 8 steps per decade; 0: the coarse grid alone). The probe with the
    best C is refit on train + validation and scored on the held-out test split (top-1, top-5).
    ``representation=backbone`` probes the representation before the projection head (SimCLR's protocol, and
    CLIP's for its ViTs); ``auto`` (the default) does so when the encoder has one; ``embedding``: its output.
    """

    def __init__(self, val_fraction: float = 0.2, refinements: int = 4, max_iter: int = 1000,
                 representation: Literal["auto", "embedding", "backbone"] = "auto") -> None:
        if not 0.0 < val_fraction < 1.0 or refinements < 0 or max_iter < 1:
            raise UserError(f"linear-probe needs 0 < val_fraction < 1, refinements >= 0 and max_iter >= 1, got "
                             f"{val_fraction}, {refinements}, {max_iter}")
        self.val_fraction = val_fraction
        self.refinements = refinements
        self.max_iter = max_iter
        self.representation = representation
        self._seen: dict[str, Any] = {}

    def protocol(self) -> dict[str, Any]:
        """The search (every C tried, with its validation top-1), the chosen C and the split sizes."""
        return {"evaluator": "linear probe (Radford et al. 2021, appendix A.3)",
                "classifier": "scikit-learn LogisticRegression, L-BFGS, L2, multinomial",
                "max_iter": self.max_iter, "representation": self.representation,
                "features": "frozen, L2-normalised",
                "search": f"log10 C from {COARSE[0]:g} to {COARSE[1]:g} step {COARSE[2]:g}, then "
                          f"{self.refinements} halvings around the best (CLIP's parametric binary search)",
                "val_fraction": self.val_fraction, "refit": "train + val", "eval_split": "test", **self._seen}

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        dataset = ctx.dataset
        representation = ctx.resolve(self.representation)
        x_train, y_train = to_numpy(*ctx.encode_split(dataset.train, representation))
        x_test, y_test = to_numpy(*ctx.encode_split(dataset.test, representation))
        classes = class_count(dataset, y_train, y_test)
        fit_idx, val_idx = (np.asarray(i) for i in held_out(y_train.tolist(), self.val_fraction))

        def val_top1(C: float) -> float:
            model = fit_logistic(x_train[fit_idx], y_train[fit_idx], C, self.max_iter)
            return float((model.predict(x_train[val_idx]) == y_train[val_idx]).mean())

        log_c, tried = binary_search_log_c(val_top1, self.refinements)
        C = 10.0 ** log_c
        model = fit_logistic(x_train, y_train, C, self.max_iter)
        self._seen = {"representation": representation,
                      "C": C, "log10_C": log_c, "grid": {f"{10.0 ** e:.4g}": 100 * s for e, s in tried.items()},
                      "train_samples": len(fit_idx), "val_samples": len(val_idx), "test_samples": len(y_test),
                      "classes": classes}
        return vote_accuracy(probe_scores(model, x_test, classes), torch.as_tensor(y_test))
