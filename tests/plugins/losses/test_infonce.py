"""The built-in InfoNCE loss: a hand-computed case, the clamp, and 2 ranks x B == 1 rank x 2B."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import assert_light, leave_rank
from plugins.losses.infonce import InfoNCE


def _ce(row: list[float], label: int) -> float:
    return -row[label] + math.log(sum(math.exp(v) for v in row))


def test_hand_computed_2x2():
    # unit vectors (scaled by 3 and 5: the loss normalises), temperature 0.5 -> scale 2
    image = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    text = torch.tensor([[5.0, 0.0], [3.0, 4.0]])  # second caption is (0.6, 0.8)
    out = InfoNCE(temperature=0.5)({"image": image, "text": text})
    # cosine similarities: image0.text0 = 1, image0.text1 = 0.6, image1.text0 = 0, image1.text1 = 0.8
    per_image = (_ce([2.0, 1.2], 0) + _ce([0.0, 1.6], 1)) / 2
    per_text = (_ce([2.0, 0.0], 0) + _ce([1.2, 1.6], 1)) / 2
    assert out["loss"].item() == pytest.approx((per_image + per_text) / 2, abs=1e-6)
    assert out["loss"].ndim == 0 and out["logit_scale"].ndim == 0
    assert out["logit_scale"].item() == pytest.approx(2.0)
    assert not out["logit_scale"].requires_grad


def test_hand_computed_3x3_gradient_of_scale():
    # orthonormal pairs: similarities are the identity, so d loss / d log(scale) has a closed form
    image = torch.eye(3)
    text = torch.eye(3)
    loss = InfoNCE(temperature=0.25)
    out = loss({"image": image, "text": text})
    s = 4.0  # every row: logits (s, 0, 0), label 0
    expected = math.log(math.exp(s) + 2) - s
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
    out["loss"].backward()
    # d/d(ln s) [ln(e^s + 2) - s] = s * (e^s / (e^s + 2) - 1)
    assert loss.logit_scale.grad.item() == pytest.approx(s * (math.exp(s) / (math.exp(s) + 2) - 1), abs=1e-6)


def test_logit_scale_parameter():
    loss = InfoNCE()
    assert loss.logit_scale.shape == (1,)  # not 0-d: DeepSpeed bf16 fails on 0-d parameters
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert loss.logit_scale.requires_grad
    assert not InfoNCE(learnable=False).logit_scale.requires_grad
    assert [n for n, _ in loss.named_parameters()] == ["logit_scale"]


def test_after_step_clamps_in_place():
    loss = InfoNCE(max_logit_scale=50.0)
    param = loss.logit_scale
    loss.after_step()
    assert param.item() == pytest.approx(math.log(1 / 0.07))  # below the cap: unchanged
    with torch.no_grad():
        param.fill_(10.0)
    loss.after_step()
    assert loss.logit_scale is param and param.item() == pytest.approx(math.log(50.0))
    assert param.requires_grad


def test_low_precision_inputs_give_fp32_loss():
    torch.manual_seed(0)
    image, text = torch.randn(4, 8), torch.randn(4, 8)
    ref = InfoNCE()({"image": image, "text": text})["loss"]
    out = InfoNCE()({"image": image.bfloat16(), "text": text.bfloat16()})["loss"]
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref.item(), abs=0.05)


def test_static_options_match_the_signature():
    assert describe("plugins.losses.infonce:InfoNCE") == _describe_object(InfoNCE)


def test_registration_imports_no_torch_and_declares_its_needs():
    assert_light("plugins.losses")
    loss = Registry.load().get("loss", "infonce")
    assert loss.declared["needs"] == {"image", "text"}
    assert [(o.name, o.default) for o in loss.options] == [("temperature", 0.07), ("learnable", True),
                                                           ("max_logit_scale", 100.0), ("tile", 0)]


# --- 2 ranks x B == 1 rank x 2B -------------------------------------------------------------------

B, WORLD = 3, 2


def _setup():
    """Identical on every rank: two linear towers, the loss, and the 2B inputs."""
    torch.manual_seed(0)
    image_tower = torch.nn.Linear(5, 4).double()
    text_tower = torch.nn.Linear(6, 4).double()
    loss = InfoNCE(temperature=0.2).double()
    x_image, x_text = torch.randn(B * WORLD, 5).double(), torch.randn(B * WORLD, 6).double()
    return [image_tower, text_tower, loss], x_image, x_text


def _step(modules, x_image, x_text):
    image_tower, text_tower, loss = modules
    out = loss({"image": image_tower(x_image), "text": text_tower(x_text)})
    out["loss"].backward()
    return out["loss"].detach(), [p.grad.clone() for m in modules for p in m.parameters()]


def _worker(rank: int, init: str, path: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    modules, x_image, x_text = _setup()
    shard = slice(rank * B, (rank + 1) * B)
    loss, grads = _step(modules, x_image[shard], x_text[shard])
    losses = [torch.empty_like(loss) for _ in range(WORLD)]
    dist.all_gather(losses, loss)
    for g in grads:  # what DeepSpeed does: average the gradients over ranks
        dist.all_reduce(g)
        g /= WORLD
    if rank == 0:
        torch.save({"losses": torch.stack(losses), "grads": grads}, path)
    leave_rank()


def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path):
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_worker, args=(f"file://{tmp_path / 'init'}", path), nprocs=WORLD, join=True)
    got = torch.load(path)
    modules, x_image, x_text = _setup()
    ref_loss, ref_grads = _step(modules, x_image, x_text)
    assert not torch.allclose(got["losses"][0], got["losses"][1])  # the ranks see different shards
    torch.testing.assert_close(got["losses"].mean(), ref_loss, rtol=0, atol=1e-5)
    assert len(got["grads"]) == len(ref_grads) == 5  # two weights, two biases, logit_scale
    for g, ref in zip(got["grads"], ref_grads, strict=True):
        assert ref.abs().sum() > 0
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-5)
