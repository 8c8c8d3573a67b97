"""The alignment + uniformity loss: hand-computed cases, the contract, and 2 ranks x B == 1 rank x 2B."""

import math

import pytest
import torch

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import check, check_loss_distributed, plugin_registry
from plugins.losses.align_uniform import AlignUniform


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def _sq_dist(a: list[float], b: list[float]) -> float:
    return sum((p - q) ** 2 for p, q in zip(a, b))


def _reference(x: list[list[float]], y: list[list[float]], alpha: float, t: float) -> tuple[float, float]:
    """Alignment and uniformity with explicit loops over the unit-normalised rows."""
    x, y = [_unit(r) for r in x], [_unit(r) for r in y]
    align = sum(_sq_dist(a, b) ** (alpha / 2) for a, b in zip(x, y)) / len(x)

    def uniform(z: list[list[float]]) -> float:
        pairs = [math.exp(-t * _sq_dist(z[i], z[j])) for i in range(len(z)) for j in range(i + 1, len(z))]
        return math.log(sum(pairs) / len(pairs))

    return align, (uniform(x) + uniform(y)) / 2


def test_antipodal_pair_in_closed_form():
    # two images at e1 and -e1 in both views: aligned (0), squared distance 4 -> uniformity log e^(-2 * 4) = -8
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    out = AlignUniform()({"views": [z, 3 * z]})
    assert out["align"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["uniform"].item() == pytest.approx(-8.0, abs=1e-5)
    assert out["loss"].item() == pytest.approx(-8.0, abs=1e-5)
    # orthogonal views of one image: ||e1 - e2||^2 = 2
    out = AlignUniform()({"views": [torch.eye(2), torch.eye(2).flip(0)]})
    assert out["align"].item() == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize(("alpha", "t", "unif_weight"), [(2.0, 2.0, 1.0), (1.0, 3.0, 0.5)])
def test_matches_explicit_loops(alpha, t, unif_weight):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    out = AlignUniform(alpha=alpha, t=t, unif_weight=unif_weight)({"views": [x, y]})
    align, uniform = _reference(x.tolist(), y.tolist(), alpha, t)
    assert out["align"].item() == pytest.approx(align, abs=1e-5)
    assert out["uniform"].item() == pytest.approx(uniform, abs=1e-5)
    assert out["loss"].item() == pytest.approx(align + unif_weight * uniform, abs=1e-5)


def test_contract_and_registration():
    registry = plugin_registry("plugins.losses")
    loss = check("loss", "align-uniform", registry, t=3.0)
    assert len(loss.views) == 2
    assert Registry.load().get("loss", "align-uniform").declared["needs"] == {"views"}
    assert describe("plugins.losses.align_uniform:AlignUniform") == _describe_object(AlignUniform)


def test_two_ranks_equal_one_rank_with_twice_the_batch():
    check_loss_distributed("align-uniform", "plugins.losses", atol=1e-5)
