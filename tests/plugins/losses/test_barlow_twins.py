"""The Barlow Twins loss: hand-computed cases, the contract, and 2 ranks x B == 1 rank x 2B."""

import math

import pytest
import torch
from ssl_reference import assert_loss_on_projector_output

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import check, check_loss_distributed, plugin_registry
from plugins.losses.barlow_twins import BarlowTwins


def _standardise(z: list[list[float]]) -> list[list[float]]:
    """Each column to mean 0 and biased variance 1 (batch norm, eps 1e-5), with loops."""
    n, d = len(z), len(z[0])
    out = [[0.0] * d for _ in range(n)]
    for k in range(d):
        mean = sum(row[k] for row in z) / n
        var = sum((row[k] - mean) ** 2 for row in z) / n
        for i in range(n):
            out[i][k] = (z[i][k] - mean) / math.sqrt(var + 1e-5)
    return out


def _reference(a: list[list[float]], b: list[list[float]], lambd: float) -> float:
    a, b = _standardise(a), _standardise(b)
    n, d = len(a), len(a[0])
    loss = 0.0
    for p in range(d):
        for q in range(d):
            c = sum(a[i][p] * b[i][q] for i in range(n)) / n
            loss += (1 - c) ** 2 if p == q else lambd * c * c
    return loss


def test_identical_decorrelated_views_in_closed_form():
    # columns (1, -1, 1, -1) and (1, 1, -1, -1): mean 0, variance 1, uncorrelated -> C = I up to eps
    z = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    out = BarlowTwins(projector=())({"views": [z, z]})
    c = 1 / (1 + 1e-5)  # the eps of the batch norm
    assert out["loss"].item() == pytest.approx(2 * (1 - c) ** 2, abs=1e-9)
    assert out["off_diag"].item() == pytest.approx(0.0, abs=1e-9)
    # the second view's first column negated: C_00 = -c, so the on-diagonal term is (1 + c)^2 + (1 - c)^2
    out = BarlowTwins(projector=())({"views": [z, z * torch.tensor([-1.0, 1.0])]})
    assert out["on_diag"].item() == pytest.approx((1 + c) ** 2 + (1 - c) ** 2, abs=1e-6)


@pytest.mark.parametrize("lambd", [5e-3, 0.5])
def test_matches_explicit_loops(lambd):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    out = BarlowTwins(lambd=lambd, projector=())({"views": [a, b]})
    assert out["loss"].item() == pytest.approx(_reference(a.tolist(), b.tolist(), lambd), rel=1e-5)


def test_the_loss_is_taken_on_the_projector_output():
    assert_loss_on_projector_output(BarlowTwins)


def test_contract_and_registration():
    registry = plugin_registry("plugins.losses")
    loss = check("loss", "barlow-twins", registry, lambd=0.01)
    assert len(loss.views) == 2
    assert Registry.load().get("loss", "barlow-twins").declared["needs"] == {"views"}
    assert describe("plugins.losses.barlow_twins:BarlowTwins") == _describe_object(BarlowTwins)


def test_two_ranks_equal_one_rank_with_twice_the_batch():
    # through the projector (narrow: the tiny tower is 16 wide) and without it, on the embeddings themselves
    check_loss_distributed("barlow-twins", "plugins.losses", atol=1e-5, projector=(32, 32, 32))
    check_loss_distributed("barlow-twins", "plugins.losses", atol=1e-5, projector=())
