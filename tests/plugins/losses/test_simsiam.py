"""SimSiam: a hand-computed loss, the stop-gradient, the heads' shapes, ranks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ssl_reference import assert_ranks_match, bound, embed, inputs, l2n, np_forward, npy

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import check, check_loss_distributed
from plugins.losses.heads import GlobalBatchNorm1d
from plugins.losses.simsiam import SimSiam


def test_hand_computed_negative_cosine():
    loss = SimSiam(dim=3, pred_dim=2)
    tower = bound(loss)
    xs = inputs(2, batch=4)
    z = [np_forward(loss.projector, np_forward(tower, npy(x))) for x in xs]
    p = [l2n(np_forward(loss.predictor, zi)) for zi in z]
    z = [l2n(zi) for zi in z]
    expected = -sum(p[a][i] @ z[b][i] for a, b in ((0, 1), (1, 0)) for i in range(4)) / 8
    out = loss(embed(tower, xs))
    assert out["loss"].item() == pytest.approx(expected, abs=1e-9)
    assert out["std"].item() == pytest.approx(np.std(z[0], axis=0, ddof=1).mean(), abs=1e-9)
    assert not out["std"].requires_grad


def test_stop_gradient_on_the_projection_target():
    # d loss / d view 1 comes only from the term where view 1 is predicted: -cos(p_1, sg(z_0)) / 2
    loss = SimSiam(dim=3, pred_dim=2)
    tower = bound(loss)
    batch = embed(tower, inputs(2, batch=4))
    loss(batch)["loss"].backward()
    v1 = batch["views"][1].detach().clone().requires_grad_(True)
    z0 = loss.projector(batch["views"][0].detach()).detach()
    p1 = loss.predictor(loss.projector(v1))
    (-F.cosine_similarity(p1, z0).mean() / 2).backward()
    torch.testing.assert_close(batch["views"][1].grad, v1.grad, rtol=0, atol=1e-12)


def test_heads_and_no_teacher():
    loss = SimSiam()
    bound(loss)
    assert [m.out_features for m in loss.projector if isinstance(m, torch.nn.Linear)] == [2048, 2048, 2048]
    assert [m.out_features for m in loss.predictor if isinstance(m, torch.nn.Linear)] == [512, 2048]
    assert isinstance(loss.projector[-1], GlobalBatchNorm1d) and loss.projector[-1].weight is None
    assert not hasattr(loss, "teacher") and not hasattr(loss, "after_step") and "student" not in vars(loss)


def test_contract_and_options():
    check("loss", "simsiam", dim=16, pred_dim=4)
    assert describe("plugins.losses.simsiam:SimSiam") == _describe_object(SimSiam)
    component = Registry.load().get("loss", "simsiam")
    assert component.declared["needs"] == {"views"}
    assert [(o.name, o.default) for o in component.options] == [("dim", 2048), ("pred_dim", 512),
                                                                ("crop_scale", (0.08, 1.0)), ("flip", True),
                                                                ("color", None), ("blur", None),
                                                                ("fix_pred_lr", True)]


def test_fixed_lr_parameters_are_the_predictor_with_fix_pred_lr():
    loss = SimSiam(dim=8, pred_dim=4)
    bound(loss)
    assert [id(p) for p in loss.fixed_lr_parameters()] == [id(p) for p in loss.predictor.parameters()]
    unfixed = SimSiam(dim=8, pred_dim=4, fix_pred_lr=False)
    bound(unfixed)
    assert unfixed.fixed_lr_parameters() == []


def test_two_ranks_equal_one_rank_with_twice_the_batch():
    check_loss_distributed("simsiam", "plugins.losses", dim=16, pred_dim=4)
    assert_ranks_match("simsiam", steps=2, dim=16, pred_dim=4)
