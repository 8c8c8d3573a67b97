"""BYOL: a hand-computed loss, the EMA target (constant and cosine tau), checkpoint state, ranks."""

import numpy as np
import pytest
import torch
from ssl_reference import assert_ranks_match, bound, embed, inputs, l2n, np_forward, npy

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import check, check_loss_distributed
from plugins.losses.byol import BYOL


def test_hand_computed_symmetric_normalised_mse():
    loss = BYOL(hidden=5, dim=3)
    tower = bound(loss)
    xs = inputs(2)
    online = [l2n(np_forward(loss.predictor, np_forward(loss.projector, np_forward(tower, npy(x))))) for x in xs]
    target = [l2n(np_forward(loss.teacher, npy(x))) for x in xs]
    expected = 0.0
    for a, b in ((0, 1), (1, 0)):  # L + L~, each the batch mean of ||p - z'||^2 = 2 - 2 cos
        expected += sum(np.sum((online[a][i] - target[b][i]) ** 2) for i in range(3)) / 3
    out = loss(embed(tower, xs))
    assert out["loss"].item() == pytest.approx(expected, abs=1e-9)
    out["loss"].backward()
    assert all(p.grad is None for p in loss.teacher.parameters())
    assert loss.predictor[0].weight.grad.abs().sum() > 0 and tower[1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize(("momentum_steps", "steps", "tau"), [(0, 7, 0.996), (10, 5, 0.998), (10, 10, 1.0)])
def test_ema_target(momentum_steps, steps, tau):
    loss = BYOL(hidden=5, dim=3, momentum_steps=momentum_steps)
    tower = bound(loss)
    loss.steps.fill_(steps)  # cosine: 1 - 0.004 * (cos(pi k / K) + 1) / 2
    online = [*tower.parameters(), *loss.projector.parameters()]
    before = [p.detach().clone() for p in loss.teacher.parameters()]
    loss.after_step()
    for t, old, s in zip(loss.teacher.parameters(), before, online, strict=True):
        torch.testing.assert_close(t, tau * old + (1 - tau) * s.detach(), rtol=0, atol=1e-12)
    assert loss.steps.item() == steps + 1
    assert not any(name.startswith("predictor") for name, _ in loss.teacher.named_parameters())


def test_state_survives_a_checkpoint_round_trip():
    loss = BYOL(hidden=5, dim=3)
    bound(loss)
    loss.after_step()
    state = loss.state_dict()
    assert not any(key.startswith("student") for key in state) and state["steps"].item() == 1
    fresh = BYOL(hidden=5, dim=3)
    bound(fresh, seed=5)
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_contract_and_options():
    check("loss", "byol", hidden=16, dim=8)
    assert describe("plugins.losses.byol:BYOL") == _describe_object(BYOL)
    component = Registry.load().get("loss", "byol")
    assert component.declared["needs"] == {"views"}
    assert [(o.name, o.default) for o in component.options] == [("tau", 0.996), ("momentum_steps", 0),
                                                                ("hidden", 4096), ("dim", 256),
                                                                ("crop_scale", (0.08, 1.0)), ("flip", True),
                                                                ("color", None)]
    assert len(BYOL().views) == 2


def test_two_ranks_equal_one_rank_with_twice_the_batch():
    check_loss_distributed("byol", "plugins.losses", hidden=16, dim=8)
    assert_ranks_match("byol", steps=2, hidden=16, dim=8)
