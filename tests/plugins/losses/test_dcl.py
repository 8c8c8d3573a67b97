"""The DCL and DCLW losses: hand-computed cases, the contract, and 2 ranks x B == 1 rank x 2B."""

import math

import pytest
import torch

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import check, check_loss_distributed, plugin_registry
from plugins.losses.dcl import DCL, DCLW


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(p * q for p, q in zip(a, b))


def _reference(views: list[list[list[float]]], temperature: float, sigma: float | None = None) -> float:
    """DCL(W) with explicit loops: for each anchor (view v, image i) and each other view w of image i,
    -weight * s / t + log sum over the views of the other images of exp(s / t)."""
    z = [[_unit(x) for x in rows] for rows in views]
    n_views, n = len(z), len(z[0])
    terms = []
    for v in range(n_views):
        for w in range(n_views):
            if v == w:
                continue
            pair = [_dot(z[v][j], z[w][j]) for j in range(n)]
            for i in range(n):
                weight = 1.0
                if sigma is not None:  # 2 - N * softmax over the batch of the positive similarities / sigma
                    weight = 2 - n * math.exp(pair[i] / sigma) / sum(math.exp(p / sigma) for p in pair)
                negatives = sum(math.exp(_dot(z[v][i], z[u][j]) / temperature)
                                for u in range(n_views) for j in range(n) if j != i)
                terms.append(-weight * pair[i] / temperature + math.log(negatives))
    return sum(terms) / len(terms)


def test_orthonormal_views_in_closed_form():
    # two images, both views equal to the image's unit vector: positive s = 1, two negatives at s = 0;
    # all positive pairs alike, so DCLW's weights are 2 - N / N = 1 and it equals DCL
    eye = torch.eye(2)
    expected = -1 / 0.5 + math.log(2)
    assert DCL(temperature=0.5)({"views": [eye, 4 * eye]})["loss"].item() == pytest.approx(expected, abs=1e-6)
    assert DCLW(temperature=0.5)({"views": [eye, 4 * eye]})["loss"].item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_explicit_loops(n_views, weighted):
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(5, 3, generator=g) for _ in range(n_views)]
    loss = DCLW(sigma=0.5, temperature=0.2, n_views=n_views) if weighted else DCL(temperature=0.2, n_views=n_views)
    expected = _reference([v.tolist() for v in views], 0.2, 0.5 if weighted else None)
    assert loss({"views": views})["loss"].item() == pytest.approx(expected, abs=1e-5)


def test_contract_and_registration():
    registry = plugin_registry("plugins.losses")
    check("loss", "dcl", registry, temperature=0.2)
    check("loss", "dclw", registry, sigma=0.3, n_views=3)
    loaded = Registry.load()
    assert loaded.get("loss", "dcl").declared["needs"] == loaded.get("loss", "dclw").declared["needs"] == {"views"}
    assert describe("plugins.losses.dcl:DCL") == _describe_object(DCL)
    assert describe("plugins.losses.dcl:DCLW") == _describe_object(DCLW)


@pytest.mark.parametrize(("name", "n_views"), [("dcl", 2), ("dclw", 2), ("dclw", 3)])
def test_two_ranks_equal_one_rank_with_twice_the_batch(name, n_views):
    check_loss_distributed(name, "plugins.losses", atol=1e-5, n_views=n_views)
