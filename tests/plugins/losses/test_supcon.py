"""The SupCon loss (L_out): hand-computed cases, the contract, and 2 ranks x B == 1 rank x 2B."""

import math

import pytest
import torch

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import check, check_loss_distributed, plugin_registry
from plugins.losses.supcon import SupCon


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _reference(views: list[list[list[float]]], labels: list[int], temperature: float) -> float:
    """SupCon L_out with explicit loops over every (view, sample) anchor: its positives are all other views
    with its label, each scored against every other view."""
    points = [(labels[i], _unit(x)) for rows in views for i, x in enumerate(rows)]
    total = 0.0
    for a, (ya, za) in enumerate(points):
        sims = [sum(p * q for p, q in zip(za, zk)) / temperature for _, zk in points]
        denominator = sum(math.exp(s) for k, s in enumerate(sims) if k != a)
        positives = [k for k, (yk, _) in enumerate(points) if yk == ya and k != a]
        total += -sum(math.log(math.exp(sims[k]) / denominator) for k in positives) / len(positives)
    return total / len(points)


def test_same_class_images_in_closed_form():
    # images 0 and 1 share a class and embed to e1, image 2 embeds to e2: an anchor of class 0 has 3 positives
    # at s = 1 and 2 negatives at s = 0; an anchor of class 1 has 1 positive at s = 1 and 4 negatives at 0
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    out = SupCon(temperature=0.5)({"views": [z, 2 * z], "label": torch.tensor([0, 0, 1])})
    class0 = -math.log(math.exp(2) / (3 * math.exp(2) + 2))
    class1 = -math.log(math.exp(2) / (math.exp(2) + 4))
    assert out["loss"].item() == pytest.approx((4 * class0 + 2 * class1) / 6, abs=1e-6)


@pytest.mark.parametrize("n_views", [2, 3])
def test_matches_explicit_loops(n_views):
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(6, 4, generator=g) for _ in range(n_views)]
    labels = [0, 1, 0, 2, 1, 0]
    out = SupCon(temperature=0.1, n_views=n_views)({"views": views, "label": torch.tensor(labels)})
    assert out["loss"].item() == pytest.approx(_reference([v.tolist() for v in views], labels, 0.1), rel=1e-5)


def test_distinct_labels_give_ntxent():
    from plugins.losses.ntxent import NTXent

    g = torch.Generator().manual_seed(1)
    views = [torch.randn(5, 4, generator=g) for _ in range(2)]
    out = SupCon(temperature=0.3)({"views": views, "label": torch.arange(5)})
    assert out["loss"].item() == pytest.approx(NTXent(temperature=0.3)({"views": views})["loss"].item(), abs=1e-6)


def test_contract_and_registration():
    registry = plugin_registry("plugins.losses")
    loss = check("loss", "supcon", registry, temperature=0.2)
    assert len(loss.views) == 2
    assert Registry.load().get("loss", "supcon").declared["needs"] == {"views", "label"}
    assert describe("plugins.losses.supcon:SupCon") == _describe_object(SupCon)


def test_two_ranks_equal_one_rank_with_twice_the_batch():
    check_loss_distributed("supcon", "plugins.losses", atol=1e-5)
