"""SwAV: Sinkhorn-Knopp by hand, a hand-computed swapped-prediction loss (with and without the queue),
prototype normalisation and freezing, checkpoint state, and ranks (the Sinkhorn sums are global)."""

import numpy as np
import pytest
import torch
from ssl_reference import assert_ranks_match, bound, embed, inputs, l2n, log_softmax, np_forward, npy

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import check, check_loss_distributed
from plugins.losses.swav import SwAV, sinkhorn

SMALL = {"prototypes": 4, "hidden": 5, "dim": 3, "local_crops": 1, "freeze_prototypes_steps": 0}


def _sinkhorn(scores: np.ndarray, eps: float = 0.05, iterations: int = 3) -> np.ndarray:
    """Algorithm of the paper's appendix: Q = exp(C^T Z / eps), alternately rows to 1/K and columns to 1/B."""
    q = np.exp(scores / eps).T
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        for row in range(k):
            q[row] /= q[row].sum() * k
        for col in range(b):
            q[:, col] /= q[:, col].sum() * b
    return (q * b).T


def test_sinkhorn_by_hand_and_marginals():
    scores = torch.tensor([[0.9, 0.1, -0.2], [0.8, 0.3, 0.0], [0.7, -0.5, 0.2], [0.1, 0.2, 0.9]], dtype=torch.float64)
    codes = sinkhorn(scores, 0.05, 3)
    np.testing.assert_allclose(codes.numpy(), _sinkhorn(scores.numpy()), rtol=1e-10)
    np.testing.assert_allclose(codes.sum(dim=1).numpy(), np.ones(4), rtol=1e-10)  # each sample: a distribution
    balanced = sinkhorn(scores, 0.05, 200)
    np.testing.assert_allclose(balanced.sum(dim=0).numpy(), np.full(3, 4 / 3), rtol=1e-6)  # equipartition
    # the first rows of the matrix (the queue) are used for the sums but their codes are not returned
    torch.testing.assert_close(sinkhorn(scores, 0.05, 3, shared=2), codes[2:], rtol=0, atol=0)


def _expected(loss: SwAV, z: list[np.ndarray], queued: list[np.ndarray] | None = None) -> float:
    c = npy(loss.prototypes.weight)
    scores = [zi @ c.T for zi in z]
    total = 0.0
    for i in range(2):  # codes of the global crops only
        shared = queued[i] @ c.T if queued is not None else np.zeros((0, len(c)))
        codes = _sinkhorn(np.concatenate([shared, scores[i]]))[len(shared):]
        sub = 0.0
        for v in range(len(z)):
            if v != i:
                sub -= sum(codes[b] @ log_softmax(scores[v][b] / 0.1) for b in range(len(codes))) / len(codes)
        total += sub / (len(z) - 1)
    return total / 2


def test_hand_computed_swapped_prediction_with_multicrop():
    loss = SwAV(**SMALL)
    assert len(loss.views) == 3  # two global crops, one local
    tower = bound(loss)
    xs = inputs(3, batch=4)
    z = [l2n(np_forward(loss.projector, np_forward(tower, npy(x)))) for x in xs]
    out = loss(embed(tower, xs))
    assert out["loss"].item() == pytest.approx(_expected(loss, z), abs=1e-9)
    out["loss"].backward()
    assert loss.prototypes.weight.grad.abs().sum() > 0 and tower[1].weight.grad.abs().sum() > 0


def test_queue_newest_first_and_used_once_full():
    loss = SwAV(**SMALL, queue_size=8)
    tower = bound(loss)
    steps = [inputs(3, batch=4, seed=s) for s in (1, 2, 3)]
    z = [[l2n(np_forward(loss.projector, np_forward(tower, npy(x)))) for x in xs] for xs in steps]
    first = loss(embed(tower, steps[0]))["loss"].item()
    assert first == pytest.approx(_expected(loss, z[0]), abs=1e-9)  # 4 of 8 slots: not used yet
    assert loss.queued.item() == 4
    loss(embed(tower, steps[1]))
    assert loss.queued.item() == 8
    for i in range(2):  # newest first, as the official code shifts it
        np.testing.assert_allclose(npy(loss.queue[i]), np.concatenate([z[1][i], z[0][i]]), atol=1e-12)
    third = loss(embed(tower, steps[2]))["loss"].item()
    # the third call scores its codes with the queue as it was before its own embeddings are enqueued
    queued = [np.concatenate([z[1][i], z[0][i]]) for i in range(2)]
    assert third == pytest.approx(_expected(loss, z[2], queued), abs=1e-9)
    assert third != pytest.approx(_expected(loss, z[2]), abs=1e-6)


def test_prototypes_normalised_after_each_step_and_frozen_at_first():
    loss = SwAV(**{**SMALL, "freeze_prototypes_steps": 2})
    tower = bound(loss)
    np.testing.assert_allclose(np.linalg.norm(npy(loss.prototypes.weight), axis=1), np.ones(4), rtol=1e-6)
    with torch.no_grad():
        loss.prototypes.weight.mul_(torch.tensor([[2.0], [0.5], [3.0], [1.0]], dtype=torch.float64))
    direction = l2n(npy(loss.prototypes.weight))
    for step in range(3):
        loss.prototypes.weight.grad = None
        loss(embed(tower, inputs(3, batch=4)))["loss"].backward()
        assert (loss.prototypes.weight.grad is None) == (step < 2)
        loss.after_step()
        np.testing.assert_allclose(npy(loss.prototypes.weight), direction, rtol=1e-12)
    assert loss.steps.item() == 3


def test_state_survives_a_checkpoint_round_trip():
    loss = SwAV(**SMALL, queue_size=8)
    tower = bound(loss)
    loss(embed(tower, inputs(3, batch=4)))
    loss.after_step()
    state = loss.state_dict()
    assert {"queue", "queued", "steps", "prototypes.weight"} <= set(state)
    fresh = SwAV(**SMALL, queue_size=8)
    bound(fresh, seed=5)
    fresh.load_state_dict(state)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_contract_and_options():
    check("loss", "swav", hidden=16, local_crops=1)
    assert describe("plugins.losses.swav:SwAV") == _describe_object(SwAV)
    component = Registry.load().get("loss", "swav")
    assert component.declared["needs"] == {"views"}
    defaults = {o.name: o.default for o in component.options}
    assert (defaults["temperature"], defaults["epsilon"], defaults["sinkhorn_iterations"]) == (0.1, 0.05, 3)
    prototypes = npy(SwAV().prototypes.weight)
    assert prototypes.shape == (30, 128)
    np.testing.assert_allclose(np.linalg.norm(prototypes, axis=1), np.ones(30), rtol=1e-6)


def test_two_ranks_equal_one_rank_with_twice_the_batch():
    check_loss_distributed("swav", "plugins.losses", hidden=16, local_crops=1, freeze_prototypes_steps=0)
    # three steps with a 16-slot queue (8 global-crop embeddings a step): the third uses it
    assert_ranks_match("swav", steps=3, hidden=16, local_crops=1, queue_size=16, freeze_prototypes_steps=1)
