"""DINO: a hand-computed multi-crop loss with centring and sharpening, the centre update, the teacher
temperature warmup, the EMA teacher, the weight-normalised head and its frozen start, checkpoint state, ranks."""

import numpy as np
import pytest
import torch
from ssl_reference import assert_ranks_match, bound, embed, inputs, l2n, log_softmax, np_forward, npy

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import check, check_loss_distributed
from plugins.losses.dino import DINO
from plugins.losses.heads import GlobalBatchNorm1d

SMALL = {"out_dim": 6, "hidden": 5, "bottleneck": 3, "local_crops": 1}


def _head(head: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    """MLP, L2 norm, then the last layer with unit-norm rows (weight norm with g = 1)."""
    w = npy(head.last_layer)
    return l2n(np_forward(head.mlp, x)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T


def _softmax(row: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(row))


def test_hand_computed_cross_entropy_between_different_views():
    loss = DINO(**SMALL)
    assert len(loss.views) == 3  # two global crops, one local
    tower = bound(loss)
    center = np.array([[0.1, -0.2, 0.3, 0.0, 0.05, -0.1]])
    loss.center.copy_(torch.from_numpy(center))
    xs = inputs(3, batch=4)
    student = [_head(loss.head, np_forward(tower, npy(x))) for x in xs]
    teacher = [_head(loss.teacher[1], np_forward(loss.teacher[0], npy(x))) for x in xs[:2]]  # global crops only
    total, terms = 0.0, 0
    for g in range(2):
        for v in range(3):
            if v == g:
                continue
            total += sum(-_softmax((teacher[g][b] - center[0]) / 0.04) @ log_softmax(student[v][b] / 0.1)
                         for b in range(4)) / 4
            terms += 1
    out = loss(embed(tower, xs))
    assert terms == 4 and out["loss"].item() == pytest.approx(total / terms, abs=1e-9)
    # the centre moved towards the batch mean of the teacher outputs of both global crops
    np.testing.assert_allclose(npy(loss.center), 0.9 * center + 0.1 * np.concatenate(teacher).mean(0), atol=1e-12)
    out["loss"].backward()
    assert all(p.grad is None for p in loss.teacher.parameters())
    assert loss.head.last_layer.grad.abs().sum() > 0 and tower[1].weight.grad.abs().sum() > 0


def test_last_layer_is_weight_normalised():
    loss = DINO(**SMALL)
    tower = bound(loss)
    v = tower(inputs(1)[0])
    before = loss.head(v)
    with torch.no_grad():
        loss.head.last_layer.mul_(torch.arange(1, 7, dtype=torch.float64)[:, None])  # rescale each row
    torch.testing.assert_close(loss.head(v), before, rtol=0, atol=1e-12)


def test_last_layer_takes_no_gradient_while_frozen():
    loss = DINO(**SMALL, freeze_last_layer_steps=2)
    tower = bound(loss)
    for step in range(3):
        loss.head.last_layer.grad = None
        loss(embed(tower, inputs(3, batch=4)))["loss"].backward()
        assert (loss.head.last_layer.grad is None) == (step < 2)
        assert loss.head.mlp[0].weight.grad.abs().sum() > 0  # the rest of the head trains throughout
        loss.head.mlp[0].weight.grad = None
        loss.after_step()


def test_teacher_temperature_warmup():
    loss = DINO(**SMALL, warmup_teacher_temp=0.02, teacher_temp=0.04, warmup_teacher_temp_steps=4)
    temps = []
    for step in (0, 2, 4, 9):
        loss.steps.fill_(step)
        temps.append(loss.teacher_temperature())
    assert temps == pytest.approx([0.02, 0.03, 0.04, 0.04])
    assert DINO().teacher_temperature() == 0.04


@pytest.mark.parametrize(("momentum_steps", "m"), [(0, 0.996), (6, 0.998)])
def test_ema_teacher(momentum_steps, m):
    loss = DINO(**SMALL, momentum_steps=momentum_steps)
    tower = bound(loss)
    loss.steps.fill_(3)  # half of the cosine: 1 - 0.004 / 2
    online = [*tower.parameters(), *loss.head.parameters()]
    before = [p.detach().clone() for p in loss.teacher.parameters()]
    loss.after_step()
    for t, old, s in zip(loss.teacher.parameters(), before, online, strict=True):
        torch.testing.assert_close(t, m * old + (1 - m) * s.detach(), rtol=0, atol=1e-12)
        assert not t.requires_grad
    assert loss.steps.item() == 4


def test_state_survives_a_checkpoint_round_trip():
    loss = DINO(**SMALL)
    tower = bound(loss)
    loss(embed(tower, inputs(3)))
    loss.after_step()
    state = loss.state_dict()
    assert {"center", "steps"} <= set(state) and not any(key.startswith("student") for key in state)
    assert state["center"].abs().sum() > 0
    fresh = DINO(**SMALL)
    bound(fresh, seed=5)
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_contract_and_options():
    check("loss", "dino", hidden=16, out_dim=32, local_crops=1)
    assert describe("plugins.losses.dino:DINO") == _describe_object(DINO)
    component = Registry.load().get("loss", "dino")
    assert component.declared["needs"] == {"views"}
    defaults = {o.name: o.default for o in component.options}
    assert (defaults["student_temp"], defaults["teacher_temp"], defaults["center_momentum"]) == (0.1, 0.04, 0.9)
    assert defaults["momentum"] == 0.996


def test_two_ranks_equal_one_rank_with_twice_the_batch():
    check_loss_distributed("dino", "plugins.losses", hidden=16, out_dim=32, local_crops=1)
    assert_ranks_match("dino", steps=2, hidden=16, out_dim=32, local_crops=1)


def test_batch_norm_in_the_head_sees_the_global_batch():
    loss = DINO(**SMALL, bn=True)
    bound(loss)
    assert sum(isinstance(m, GlobalBatchNorm1d) for m in loss.head.mlp) == 2  # after both hidden layers
    plain = DINO(**SMALL)
    bound(plain)
    assert not any(isinstance(m, GlobalBatchNorm1d) for m in plain.head.modules())
    check_loss_distributed("dino", "plugins.losses", hidden=16, out_dim=32, local_crops=1, bn=True)
