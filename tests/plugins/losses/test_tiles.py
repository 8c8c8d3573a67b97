"""Tiled image-text losses (Inf-CL): the loss and gradients of the whole similarity matrix, computed without any
tensor larger than ``tile`` rows of it, in the forward pass or the backward pass, and exact across ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from orchestrator.testing import check_loss_distributed
from plugins.losses.filip import FILIP
from plugins.losses.infonce import InfoNCE
from plugins.losses.siglip import SigLIP
from plugins.losses.soft_infonce import SoftInfoNCE

LOSSES = {"infonce": InfoNCE, "siglip": SigLIP, "soft-infonce": SoftInfoNCE}
OPTIONS = {"infonce": {"temperature": 0.1}, "siglip": {"init_scale": 3.0, "init_bias": -1.0},
           "soft-infonce": {"temperature": 0.1, "weights": "image"}}


def _embeddings(n: int, dim: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(n, dim, generator=generator, dtype=dtype).requires_grad_()
    text = torch.randn(n, dim, generator=generator, dtype=dtype).requires_grad_()
    return image, text


def _loss_and_grads(loss: nn.Module, image: torch.Tensor, text: torch.Tensor) -> list[torch.Tensor]:
    image.grad = text.grad = None
    out = loss({"image": image, "text": text})["loss"]
    out.backward()
    return [out.detach(), image.grad, text.grad, *(p.grad for p in loss.parameters())]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("tile", [1, 3, 4, 9])
def test_tiles_give_the_loss_and_gradients_of_the_whole_matrix(name: str, tile: int) -> None:
    image, text = _embeddings(10, 6)  # 10 rows: tiles of 3 and 4 leave a short last tile
    whole = _loss_and_grads(LOSSES[name](**OPTIONS[name]).double(), image, text)
    tiled = _loss_and_grads(LOSSES[name](**OPTIONS[name], tile=tile).double(), image, text)
    assert all(g is not None and g.abs().sum() > 0 for g in whole)
    for a, b in zip(whole, tiled, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", LOSSES)
def test_tiles_in_fp32_and_a_tile_of_the_whole_batch(name: str) -> None:
    image, text = _embeddings(32, 16, torch.float32)
    whole = _loss_and_grads(LOSSES[name](), image, text)
    for tile in (8, 32, 100):  # 32 and 100: one tile, the plain computation
        for a, b in zip(whole, _loss_and_grads(LOSSES[name](tile=tile), image, text), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * max(1.0, a.abs().max().item()))


class _LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operator returns (forward and backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("name", LOSSES)
def test_no_tensor_holds_more_than_a_tile_of_the_matrix(name: str) -> None:
    n, dim, tile = 64, 8, 16
    image, text = _embeddings(n, dim, torch.float32)
    largest = {}
    for t in (0, tile):
        loss = LOSSES[name](tile=t)
        with _LargestTensor() as mode:
            loss({"image": image, "text": text})["loss"].backward()
        largest[t] = mode.largest
    assert largest[0] == n * n  # untiled: the whole similarity matrix exists
    assert largest[tile] == tile * n  # tiled: one tile of it at a time, in both passes


def _tokens(n: int, k: int, r: int, dim: int) -> dict[str, torch.Tensor]:
    """n images of k tokens and n texts of r tokens, some masked (every sample keeps its first token)."""
    generator = torch.Generator().manual_seed(0)
    image_mask = torch.rand(n, k, generator=generator) < 0.7
    image_mask[:, 0] = True
    return {"image_tokens": torch.randn(n, k, dim, generator=generator, dtype=torch.float64).requires_grad_(),
            "text_tokens": torch.randn(n, r, dim, generator=generator, dtype=torch.float64).requires_grad_(),
            "image_mask": image_mask,
            "text_mask": torch.arange(r) < torch.randint(1, r + 1, (n, 1), generator=generator)}


@pytest.mark.parametrize("tile", [1, 3, 4])
@pytest.mark.parametrize("global_weight", [0.0, 0.5])
def test_filip_tiles_give_the_loss_and_gradients_of_the_whole_similarity(tile: int, global_weight: float) -> None:
    batch = _tokens(10, 4, 5, 6)
    results = []
    for t in (0, tile):
        loss = FILIP(temperature=0.2, global_weight=global_weight, tile=t).double()
        batch["image_tokens"].grad = batch["text_tokens"].grad = None
        out = loss(batch)["loss"]
        out.backward()
        results.append([out.detach(), batch["image_tokens"].grad, batch["text_tokens"].grad, loss.logit_scale.grad])
    assert all(g.abs().sum() > 0 for g in results[0])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_filip_holds_a_tile_of_the_token_similarities() -> None:
    n, k, r, tile = 32, 3, 4, 8
    batch = {key: v.detach().float().requires_grad_(v.requires_grad) for key, v in _tokens(n, k, r, 8).items()}
    largest = {}
    for t in (0, tile):
        with _LargestTensor() as mode:
            FILIP(tile=t)(batch)["loss"].backward()
        largest[t] = mode.largest
    assert largest[0] == n * n * k * r  # every image token against every text token of every sample
    assert largest[tile] == tile * n * k * r


def test_a_negative_tile_is_refused() -> None:
    for loss in [*LOSSES.values(), FILIP]:
        with pytest.raises(ValueError, match="tile=-1 must be 0"):
            loss(tile=-1)


@pytest.mark.parametrize("name", LOSSES)
def test_two_ranks_equal_one_rank_with_twice_the_batch_when_tiled(name: str) -> None:
    # 2 ranks x 8 rows in tiles of 3 (a short last tile) against 1 rank x 16 rows in tiles of 3
    check_loss_distributed(name, "plugins.losses", atol=1e-5, tile=3)


@pytest.mark.slow
def test_a_tiled_zero_3_run_on_two_ranks_follows_the_untiled_one(workdir) -> None:  # noqa: ANN001 - the fixture
    """Through the real launcher: 2 gloo ranks, ZeRO-3 (the learnable temperature partitioned), the tiles
    recomputed in DeepSpeed's backward. The loss curve is the untiled run's, to fp32 rounding."""
    from orchestrator.store import Store
    from tests.conftest import orch

    tiny = ["--encoder", "vit:depth=1,width=32,heads=2,embed_dim=32", "--text-encoder",
            "text-transformer:depth=1,width=32,heads=2,embed_dim=32", "--batch-size", "64", "--steps", "3",
            "--log-every", "1", "--eval", "zs:split=test", "--zero", "3", "--gpus", "2", "--quiet"]
    for loss in ("infonce", "infonce:tile=12"):  # 32 rows per rank: tiles of 12, 12 and 8
        result = orch("run", *tiny, "--loss", loss, cwd=workdir)
        assert result.returncode == 0, result.stdout + result.stderr
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    curves = [[(m["step"], m["name"], m["value"]) for m in store.metrics(i)
               if m["name"] in ("train/loss", "train/logit_scale")] for i in (1, 2)]
    assert len(curves[0]) == 6 and [c[:2] for c in curves[1]] == [c[:2] for c in curves[0]]
    for (_, name, tiled), (_, _, whole) in zip(curves[1], curves[0], strict=True):
        assert tiled == pytest.approx(whole, abs=1e-5), name
