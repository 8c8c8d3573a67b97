"""The VICReg loss: hand-computed cases, the contract, and 2 ranks x B == 1 rank x 2B."""

import math

import pytest
import torch
from ssl_reference import assert_loss_on_projector_output

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import check, check_loss_distributed, plugin_registry
from plugins.losses.vicreg import VICReg


def _terms(z: list[list[float]], gamma: float, eps: float) -> tuple[float, float]:
    """Variance hinge and off-diagonal covariance of one view, unbiased statistics, with loops."""
    n, d = len(z), len(z[0])
    mean = [sum(row[k] for row in z) / n for k in range(d)]
    cov = [[sum((row[p] - mean[p]) * (row[q] - mean[q]) for row in z) / (n - 1) for q in range(d)] for p in range(d)]
    variance = sum(max(0.0, gamma - math.sqrt(cov[k][k] + eps)) for k in range(d)) / d
    covariance = sum(cov[p][q] ** 2 for p in range(d) for q in range(d) if p != q) / d
    return variance, covariance


def _reference(a: list[list[float]], b: list[list[float]], gamma: float = 1.0, eps: float = 1e-4) -> dict:
    n, d = len(a), len(a[0])
    invariance = sum((a[i][k] - b[i][k]) ** 2 for i in range(n) for k in range(d)) / (n * d)
    (va, ca), (vb, cb) = _terms(a, gamma, eps), _terms(b, gamma, eps)
    return {"invariance": invariance, "variance": (va + vb) / 2, "covariance": ca + cb}


def test_collapsed_views_in_closed_form():
    # every embedding the same vector: no invariance or covariance term, the variance hinge at 1 - sqrt(eps)
    z = torch.ones(4, 3)
    out = VICReg(projector=())({"views": [z, z]})
    assert out["invariance"].item() == pytest.approx(0.0) and out["covariance"].item() == pytest.approx(0.0)
    assert out["loss"].item() == pytest.approx(25 * (1 - math.sqrt(1e-4)), abs=1e-5)
    # views (0, 0) and (2, 2) for image 0, (1, 1) twice for image 1: MSE = (4 + 4) / 4; in each view both
    # columns have unbiased variance 0.5 and covariance 0.5 (squared twice, over d = 2, summed over the views)
    a = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[2.0, 2.0], [1.0, 1.0]])
    out = VICReg(projector=())({"views": [a, b]})
    assert out["invariance"].item() == pytest.approx(2.0)
    assert out["covariance"].item() == pytest.approx(2 * (2 * 0.5**2 / 2))
    assert out["variance"].item() == pytest.approx(1 - math.sqrt(0.5 + 1e-4), abs=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_matches_explicit_loops(gamma):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    out = VICReg(sim_coeff=25.0, std_coeff=10.0, cov_coeff=2.0, gamma=gamma, projector=())({"views": [a, b]})
    ref = _reference(a.tolist(), b.tolist(), gamma)
    for key in ("invariance", "variance", "covariance"):
        assert out[key].item() == pytest.approx(ref[key], rel=1e-5)
    expected = 25 * ref["invariance"] + 10 * ref["variance"] + 2 * ref["covariance"]
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_the_loss_is_taken_on_the_projector_output():
    assert_loss_on_projector_output(VICReg)


def test_contract_and_registration():
    registry = plugin_registry("plugins.losses")
    loss = check("loss", "vicreg", registry, cov_coeff=0.5)
    assert len(loss.views) == 2
    assert Registry.load().get("loss", "vicreg").declared["needs"] == {"views"}
    assert describe("plugins.losses.vicreg:VICReg") == _describe_object(VICReg)


def test_two_ranks_equal_one_rank_with_twice_the_batch():
    # through the projector (narrow: the tiny tower is 16 wide) and without it, on the embeddings themselves
    check_loss_distributed("vicreg", "plugins.losses", atol=1e-5, projector=(32, 32, 32))
    check_loss_distributed("vicreg", "plugins.losses", atol=1e-5, projector=())
