"""FILIP's token-wise loss: hand-computed similarities and loss, masking, the global term, 2 ranks == 1."""

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from orchestrator.registry import Registry, _describe_object, describe
from orchestrator.testing import assert_light, build, leave_rank
from plugins.losses.filip import FILIP, token_similarity
from plugins.losses.infonce import InfoNCE


def _unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(c * c for c in v))
    return [c / n for c in v]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _ce(row: list[float], label: int) -> float:
    return -row[label] + math.log(sum(math.exp(v) for v in row))


def _late(queries, query_mask, keys, key_mask) -> list[list[float]]:
    """s_ij = mean over the real tokens k of i of max over the real tokens r of j of cos(q_ik, k_jr)."""
    out = []
    for qi, mi in zip(queries, query_mask):
        row = []
        for kj, mj in zip(keys, key_mask):
            best = [max(_dot(_unit(q), _unit(k)) for k, real in zip(kj, mj) if real) for q, m in zip(qi, mi) if m]
            row.append(sum(best) / len(best))
        out.append(row)
    return out


# 2 images of 3 tokens (the last of image 1 is masked) and 2 texts of 3 tokens (the last of text 0 is padding)
IMAGE = [[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], [[1.0, -1.0], [2.0, 1.0], [9.0, 9.0]]]
IMAGE_MASK = [[True, True, True], [True, True, False]]
TEXT = [[[1.0, 0.5], [-1.0, 1.0], [7.0, -7.0]], [[0.0, 1.0], [1.0, 2.0], [-1.0, -0.5]]]
TEXT_MASK = [[True, True, False], [True, True, True]]


def _batch(image=IMAGE, text=TEXT):
    return {"image_tokens": torch.tensor(image), "image_mask": torch.tensor(IMAGE_MASK),
            "text_tokens": torch.tensor(text), "text_mask": torch.tensor(TEXT_MASK)}


def test_token_similarity_hand_computed():
    b = _batch()
    unit = {k: torch.nn.functional.normalize(b[k], dim=-1) for k in ("image_tokens", "text_tokens")}
    s_image = token_similarity(unit["image_tokens"], b["image_mask"], unit["text_tokens"], b["text_mask"])
    s_text = token_similarity(unit["text_tokens"], b["text_mask"], unit["image_tokens"], b["image_mask"])
    torch.testing.assert_close(s_image, torch.tensor(_late(IMAGE, IMAGE_MASK, TEXT, TEXT_MASK)))
    torch.testing.assert_close(s_text, torch.tensor(_late(TEXT, TEXT_MASK, IMAGE, IMAGE_MASK)))
    assert not torch.allclose(s_image, s_text.T)  # the two directions differ: max is taken on the other side


def test_loss_hand_computed():
    out = FILIP(temperature=0.5)(_batch())
    s_image, s_text = _late(IMAGE, IMAGE_MASK, TEXT, TEXT_MASK), _late(TEXT, TEXT_MASK, IMAGE, IMAGE_MASK)
    expected = sum(_ce([2.0 * v for v in s_image[i]], i) + _ce([2.0 * v for v in s_text[i]], i) for i in range(2)) / 4
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
    assert out["token_loss"].item() == pytest.approx(expected, abs=1e-6)
    assert out["logit_scale"].item() == pytest.approx(2.0) and "global_loss" not in out


def test_masked_tokens_do_not_count():
    image = [[row[:] for row in sample] for sample in IMAGE]
    text = [[row[:] for row in sample] for sample in TEXT]
    image[1][2], text[0][2] = [-3.0, 5.0], [0.1, 4.0]  # change only masked tokens
    torch.testing.assert_close(FILIP()(_batch(image, text))["loss"], FILIP()(_batch())["loss"])


def test_global_term_is_infonce_on_the_masked_mean_tokens():
    batch = _batch()
    out = FILIP(temperature=0.5, global_weight=0.25)(batch)
    means = {}
    for key in ("image", "text"):
        w = batch[f"{key}_mask"].unsqueeze(-1).float()
        means[key] = (batch[f"{key}_tokens"] * w).sum(1) / w.sum(1)
    global_loss = InfoNCE(temperature=0.5)(means)["loss"]
    assert out["global_loss"].item() == pytest.approx(global_loss.item(), abs=1e-6)
    assert out["loss"].item() == pytest.approx(out["token_loss"].item() + 0.25 * global_loss.item(), abs=1e-6)


def test_gradients_reach_tokens_and_temperature():
    batch = _batch()
    for key in ("image_tokens", "text_tokens"):
        batch[key].requires_grad_(True)
    loss = FILIP()
    loss(batch)["loss"].backward()
    assert batch["image_tokens"].grad.abs().sum() > 0 and batch["text_tokens"].grad.abs().sum() > 0
    assert batch["image_tokens"].grad[1, 2].abs().sum() == 0  # a masked token gets no gradient
    assert loss.logit_scale.grad is not None and loss.logit_scale.shape == (1,)
    loss.after_step()


def test_registration():
    assert_light("plugins.losses")
    loss = Registry.load().get("loss", "filip")
    assert loss.declared["needs"] == {"image-tokens", "text-tokens"}
    assert [(o.name, o.default) for o in loss.options] == [("temperature", 0.07), ("learnable", True),
                                                           ("max_logit_scale", 100.0), ("global_weight", 0.0),
                                                           ("tile", 0)]
    assert describe("plugins.losses.filip:FILIP") == _describe_object(FILIP)
    assert isinstance(build("loss", "filip", None, global_weight=0.5), FILIP)
    with pytest.raises(ValueError, match="global_weight"):
        FILIP(global_weight=-1.0)


# --- 2 ranks x B == 1 rank x 2B (check_loss_distributed takes pooled embeddings, so spawn the ranks here) ----

B, WORLD, K, R, D = 3, 2, 4, 5, 8


def _grads(shard: slice | None, global_weight: float, tile: int) -> dict:
    torch.manual_seed(0)
    loss = FILIP(temperature=0.2, global_weight=global_weight, tile=tile).double()
    image, text = torch.randn(B * WORLD, K, D).double(), torch.randn(B * WORLD, R, D).double()
    image_mask = torch.rand(B * WORLD, K) < 0.7
    text_mask = torch.arange(R) < torch.randint(1, R + 1, (B * WORLD, 1))  # 1..R real tokens, then padding
    image_mask[:, 0] = True
    batch = {"image_tokens": image, "image_mask": image_mask, "text_tokens": text, "text_mask": text_mask}
    if shard is not None:
        batch = {k: v[shard] for k, v in batch.items()}
    batch["image_tokens"].requires_grad_(True)
    batch["text_tokens"].requires_grad_(True)
    out = loss(batch)
    out["loss"].backward()
    return {"loss": out["loss"].detach(), "image": batch["image_tokens"].grad, "text": batch["text_tokens"].grad,
            "scale": loss.logit_scale.grad}


def _rank(rank: int, tmp: str, global_weight: float, tile: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=WORLD)
    torch.save(_grads(slice(rank * B, (rank + 1) * B), global_weight, tile), Path(tmp) / f"rank{rank}.pt")
    leave_rank()


@pytest.mark.parametrize("global_weight, tile", [(0.0, 0), (0.5, 0), (0.0, 2)])  # tiles of 2 of 3 rows per rank
def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path, global_weight, tile):
    mp.spawn(_rank, args=(str(tmp_path), global_weight, tile), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    ref = _grads(None, global_weight, tile)
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])  # the ranks see different shards
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, ref["loss"], rtol=0, atol=1e-5)
    for key in ("image", "text"):  # the gather's backward sums the ranks' losses: / WORLD for their mean
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]) / WORLD, ref[key], rtol=0, atol=1e-5)
    torch.testing.assert_close(sum(r["scale"] for r in ranks) / WORLD, ref["scale"], rtol=0, atol=1e-5)
