"""MoCo v2/v3: hand-computed losses, the queue ring, the EMA, checkpoint state, 2 ranks x B == 1 rank x 2B."""

import numpy as np
import pytest
import torch
from ssl_reference import assert_ranks_match, bound, embed, inputs, l2n, log_softmax, np_forward, npy

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import check, check_loss_distributed
from plugins.losses.heads import cosine_momentum
from plugins.losses.moco import MoCo


def _features(loss: MoCo, xs: list[torch.Tensor]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Queries from the student (encoder, projector, v3: predictor) and keys from the teacher, in numpy."""
    queries = [np_forward(loss.projector, np_forward(loss.student, npy(x))) for x in xs]
    if loss.version == "v3":
        queries = [np_forward(loss.predictor, q) for q in queries]
    keys = [np_forward(loss.teacher, npy(x)) for x in xs]
    return [l2n(q) for q in queries], [l2n(k) for k in keys]


def test_v2_hand_computed_queue_loss_and_enqueue():
    loss = MoCo(queue_size=8, hidden=5, dim=3, temperature=0.2)
    tower = bound(loss)
    queue = npy(loss.queue).copy()
    xs = inputs(2)
    q, k = _features(loss, xs)
    expected = 0.0
    for a, b in ((0, 1), (1, 0)):  # both views are queries, each against the other's key and the queue
        for i in range(3):
            row = [q[a][i] @ k[b][i]] + [q[a][i] @ queue[j] for j in range(8)]
            expected -= log_softmax(np.array(row) / 0.2)[0] / 6
    out = loss(embed(tower, xs))
    assert out["loss"].item() == pytest.approx(expected, abs=1e-9)
    # both views' keys of every sample, view 0 first, take the oldest slots in order
    np.testing.assert_allclose(npy(loss.queue[:6]), np.concatenate([k[0], k[1]]), atol=1e-12)
    np.testing.assert_allclose(npy(loss.queue[6:]), queue[6:])
    assert loss.queue_ptr.item() == 6
    out["loss"].backward()
    assert all(p.grad is None for p in loss.teacher.parameters())
    assert tower[1].weight.grad.abs().sum() > 0 and loss.projector[0].weight.grad.abs().sum() > 0


def test_v2_queue_is_a_ring_oldest_first():
    loss = MoCo(queue_size=8, hidden=5, dim=3)
    bound(loss)
    first, second = torch.randn(6, 3).double(), torch.randn(6, 3).double()
    loss._enqueue(first)
    loss._enqueue(second)  # slots 6, 7, then wraps to 0..3
    np.testing.assert_array_equal(npy(loss.queue), np.concatenate([second[2:], first[4:], second[:2]]))
    assert loss.queue_ptr.item() == 4
    loss._enqueue(torch.randn(20, 3).double())  # more keys than slots: the newest 8 are kept
    assert loss.queue_ptr.item() == 4


def test_v3_hand_computed_symmetric_in_batch_loss():
    loss = MoCo(version="v3", hidden=5, dim=3, temperature=0.2)
    assert not hasattr(loss, "queue")
    tower = bound(loss)
    xs = inputs(2)
    q, k = _features(loss, xs)
    expected = 0.0
    for a, b in ((0, 1), (1, 0)):
        for i in range(3):
            row = np.array([q[a][i] @ k[b][j] for j in range(3)]) / 0.2
            expected -= log_softmax(row)[i] / 3 * 2 * 0.2  # the official 2T factor
    assert loss(embed(tower, xs))["loss"].item() == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_ema_of_encoder_and_projector(version):
    loss = MoCo(version=version, hidden=5, dim=3)
    tower = bound(loss)
    m = 0.99
    online = [*tower.parameters(), *loss.projector.parameters()]
    before = [p.detach().clone() for p in loss.teacher.parameters()]
    loss.after_step()
    for t, old, s in zip(loss.teacher.parameters(), before, online, strict=True):
        torch.testing.assert_close(t, m * old + (1 - m) * s.detach(), rtol=0, atol=1e-12)
        assert not t.requires_grad
    assert loss.steps.item() == 1
    if version == "v3":  # the predictor is online only
        assert not any(name.startswith("predictor") for name, _ in loss.teacher.named_parameters())


def test_cosine_momentum_schedule():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 500, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 50, 0) == 0.99
    loss = MoCo(version="v3", momentum_steps=4, hidden=5, dim=3)
    tower = bound(loss)
    loss.steps.fill_(2)  # m = 1 - 0.01 * (cos(pi/2) + 1) / 2 = 0.995
    before = [p.detach().clone() for p in loss.teacher.parameters()]
    loss.after_step()
    t, s = next(iter(loss.teacher.parameters())), next(iter(tower.parameters()))
    torch.testing.assert_close(t, 0.995 * before[0] + 0.005 * s.detach(), rtol=0, atol=1e-12)


def test_state_survives_a_checkpoint_round_trip():
    loss = MoCo(queue_size=8, hidden=5, dim=3)
    tower = bound(loss)
    loss(embed(tower, inputs(2)))
    loss.after_step()
    state = loss.state_dict()
    assert not any(key.startswith("student") for key in state)
    assert {"queue", "queue_ptr", "steps"} <= set(state) and any(key.startswith("teacher.") for key in state)
    fresh = MoCo(queue_size=8, hidden=5, dim=3)
    bound(fresh, seed=5)
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert fresh.queue_ptr.item() == 6 and fresh.steps.item() == 1


def test_teacher_is_a_frozen_copy_not_the_student():
    loss = MoCo(hidden=5, dim=3)
    tower = bound(loss, perturb=False)
    assert loss.student is tower and "student" not in dict(loss.named_children())
    for t, s in zip(loss.teacher[0].parameters(), tower.parameters(), strict=True):
        assert t.data_ptr() != s.data_ptr() and torch.equal(t, s) and not t.requires_grad


def test_contract_and_options():
    check("loss", "moco", hidden=16)
    check("loss", "moco", version="v3", hidden=16)
    assert describe("plugins.losses.moco:MoCo") == _describe_object(MoCo)
    component = Registry.load().get("loss", "moco")
    assert component.declared["needs"] == {"views"}
    assert [(o.name, o.default) for o in component.options][:3] == [("version", "v2"), ("temperature", 0.2),
                                                                   ("momentum", 0.99)]
    assert len(MoCo().views) == 2 and MoCo().queue.shape == (4096, 128)


@pytest.mark.parametrize("version", ["v2", "v3"])
def test_two_ranks_equal_one_rank_with_twice_the_batch(version):
    check_loss_distributed("moco", "plugins.losses", version=version, hidden=16, queue_size=32)


def test_queue_and_teacher_identical_on_every_rank_over_steps():
    # three steps: the queue (32 slots, 16 keys a step) wraps, and later losses use the enqueued keys
    assert_ranks_match("moco", steps=3, hidden=16, queue_size=32)
    assert_ranks_match("moco", steps=2, version="v3", hidden=16)
