"""The CWCL soft-target InfoNCE: hand-computed cases, w = I is InfoNCE, detached targets, 2 ranks == 1."""

import math

import pytest
import torch
import torch.nn.functional as F

from orchestrator.distributed import rank
from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import assert_light, check, check_loss_distributed
from plugins.losses.infonce import InfoNCE
from plugins.losses.soft_infonce import SoftInfoNCE


def _unit(rows: list[list[float]]) -> list[list[float]]:
    return [[v / math.sqrt(sum(c * c for c in row)) for v in row] for row in rows]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _expected(image: list[list[float]], text: list[list[float]], scale: float, weights_from: str) -> float:
    """CWCL by explicit loops: w_ij = (q_i.q_j + 1) / 2, row-normalised, soft cross-entropy both ways."""
    image, text = _unit(image), _unit(text)
    q = text if weights_from == "text" else image
    n = len(image)
    total = 0.0
    for queries, keys in ((image, text), (text, image)):
        for i in range(n):
            w = [(_dot(q[i], q[j]) + 1) / 2 for j in range(n)]
            logits = [scale * _dot(queries[i], keys[j]) for j in range(n)]
            log_z = math.log(sum(math.exp(v) for v in logits))
            total -= sum(w[j] / sum(w) * (logits[j] - log_z) for j in range(n)) / n
    return total / 2


IMAGE = [[1.0, 2.0, 0.5], [0.0, 1.0, -1.0], [2.0, -1.0, 1.0]]
TEXT = [[1.0, 1.5, 0.0], [0.5, 1.0, -2.0], [1.0, -1.0, 0.0]]


@pytest.mark.parametrize("weights", ["text", "image"])
def test_hand_computed_3x3(weights):
    out = SoftInfoNCE(weights=weights, temperature=0.5)({"image": torch.tensor(IMAGE), "text": torch.tensor(TEXT)})
    assert out["loss"].item() == pytest.approx(_expected(IMAGE, TEXT, 2.0, weights), abs=1e-6)
    assert out["logit_scale"].item() == pytest.approx(2.0) and out["loss"].ndim == 0


def test_targets_hand_computed():
    # orthogonal texts: similarity 0 off the diagonal -> w = 1/2 there, 1 on it; rows sum to 2 -> (1/2, 1/4, 1/4)
    loss = SoftInfoNCE()
    targets = loss.targets(torch.eye(3), torch.eye(3))
    torch.testing.assert_close(targets, torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]))


class OneHot(SoftInfoNCE):
    """w = I: the one-hot targets of InfoNCE, on this rank's rows of the gathered batch (untiled: ``rows`` is
    the whole local batch)."""

    def targets(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        b = rows.shape[0]
        return F.one_hot(torch.arange(b) + b * rank(), columns.shape[0]).to(rows.dtype)


def test_identity_weights_are_infonce():
    torch.manual_seed(0)
    image, text = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    soft, hard = OneHot(temperature=0.1), InfoNCE(temperature=0.1)
    out = soft({"image": image, "text": text})["loss"]
    grads = torch.autograd.grad(out, [image, text, soft.logit_scale])
    ref = hard({"image": image, "text": text})["loss"]
    ref_grads = torch.autograd.grad(ref, [image, text, hard.logit_scale])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-6)


def test_targets_carry_no_gradient():
    torch.manual_seed(0)
    image, text = torch.randn(5, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
    loss = SoftInfoNCE(temperature=0.2)
    grads = torch.autograd.grad(loss({"image": image, "text": text})["loss"], [image, text])
    # the same loss with the targets computed up front as constants
    u_image, u_text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    w = ((u_text @ u_text.T).detach() + 1) / 2
    w = w / w.sum(dim=-1, keepdim=True)
    logits = 5.0 * u_image @ u_text.T
    ref = (-(w * logits.log_softmax(-1)).sum(-1).mean() - (w * logits.T.log_softmax(-1)).sum(-1).mean()) / 2
    for g, r in zip(grads, torch.autograd.grad(ref, [image, text]), strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-6)


def test_options_and_after_step():
    loss = SoftInfoNCE(max_logit_scale=50.0)
    assert loss.logit_scale.shape == (1,) and loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)
    loss.after_step()
    assert loss.logit_scale.item() == pytest.approx(math.log(50.0))
    assert not SoftInfoNCE(learnable=False).logit_scale.requires_grad
    with pytest.raises(ValueError, match="weights"):
        SoftInfoNCE(weights="label")


def test_contract_and_registration():
    assert_light("plugins.losses")
    check("loss", "soft-infonce")
    loss = Registry.load().get("loss", "soft-infonce")
    assert loss.declared["needs"] == {"image", "text"}
    assert [o.name for o in loss.options] == ["weights", "temperature", "learnable", "max_logit_scale", "tile"]
    assert describe("plugins.losses.soft_infonce:SoftInfoNCE") == _describe_object(SoftInfoNCE)


@pytest.mark.parametrize("weights", ["text", "image"])
def test_two_ranks_equal_one_rank_with_twice_the_batch(weights):
    check_loss_distributed("soft-infonce", "plugins.losses", atol=1e-5, weights=weights)
