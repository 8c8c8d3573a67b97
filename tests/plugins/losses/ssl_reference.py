"""Shared by the tests of the losses with heads (moco, byol, simsiam, swav, dino, barlow-twins, vicreg): a
tiny bound encoder, a numpy forward of the small modules they use (to compute expected values without their code), and a
gloo run of several steps that compares losses, gradients and state with one process on the whole batch."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from orchestrator.testing import build, leave_rank, plugin_registry
from plugins.losses.heads import GlobalBatchNorm1d


class TinyTower(nn.Sequential):
    """1 x 4 x 4 inputs, flattened, one linear layer to ``embed_dim``."""

    def __init__(self, embed_dim: int = 4) -> None:
        super().__init__(nn.Flatten(), nn.Linear(16, embed_dim))
        self.embed_dim = embed_dim


def bound(loss: nn.Module, seed: int = 0, embed_dim: int = 4, perturb: bool = True) -> TinyTower:
    """Bind ``loss`` to a fresh float64 tiny tower; ``perturb`` moves the teacher away from the student
    (as training would), so that a test tells which network computed what."""
    torch.manual_seed(seed)
    tower = TinyTower(embed_dim).double()
    loss.bind(tower)
    loss.double()
    if perturb and hasattr(loss, "teacher"):
        with torch.no_grad():
            for p in loss.teacher.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return tower


def inputs(n_views: int, batch: int = 3, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(n_views)]


def embed(tower: nn.Module, xs: list[torch.Tensor]) -> dict[str, Any]:
    views = [tower(x) for x in xs]
    for v in views:
        v.retain_grad()
    return {"views": views, "view_inputs": xs}


def np_forward(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """The forward of the modules these losses are built from, in numpy, from their parameters alone."""
    if isinstance(module, nn.Sequential):
        for m in module:
            x = np_forward(m, x)
        return x
    if isinstance(module, nn.Flatten):
        return x.reshape(len(x), -1)
    if isinstance(module, nn.Linear):
        out = x @ npy(module.weight).T
        return out if module.bias is None else out + npy(module.bias)
    if isinstance(module, GlobalBatchNorm1d):
        out = (x - x.mean(0)) / np.sqrt(x.var(0) + module.eps)
        return out if module.weight is None else out * npy(module.weight) + npy(module.bias)
    if isinstance(module, nn.ReLU):
        return np.maximum(x, 0.0)
    if isinstance(module, nn.GELU):
        return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
    raise TypeError(f"no numpy forward for {type(module).__name__}")


def npy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def log_softmax(row: np.ndarray) -> np.ndarray:
    top = row.max()
    return row - top - math.log(sum(math.exp(v - top) for v in row))


# --- several steps on gloo ranks vs one process -----------------------------------------------------

def _run(name: str, options: dict[str, Any], n: int, steps: int, shard: tuple[int, int] | None) -> dict[str, Any]:
    """``steps`` forward/backward/after_step on the (shard of the) same batches; losses, last grads, state."""
    torch.manual_seed(0)
    loss = build("loss", name, plugin_registry("plugins.losses"), **options)
    torch.manual_seed(2)
    tower = TinyTower(8)
    loss.bind(tower)
    g = torch.Generator().manual_seed(3)
    out: dict[str, Any] = {"losses": []}
    for _ in range(steps):
        xs = [torch.randn(n, 1, 4, 4, generator=g) for _ in loss.views]
        if shard is not None:
            rank, world = shard
            xs = [x[rank * (n // world):(rank + 1) * (n // world)] for x in xs]
        for p in [*tower.parameters(), *loss.parameters()]:
            p.grad = None
        value = loss(embed(tower, xs))["loss"]
        value.backward()
        with torch.no_grad():  # a plain SGD step: the teacher then has something to follow
            for p in [*tower.parameters(), *loss.parameters()]:
                if p.grad is not None:
                    grad = p.grad.clone()
                    if shard is not None:
                        dist.all_reduce(grad)
                        grad /= shard[1]
                    p -= 0.5 * grad
        if hasattr(loss, "after_step"):
            loss.after_step()
        out["losses"].append(float(value.detach()))
    out["grads"] = {k: p.grad.clone() for k, p in [*tower.named_parameters(), *loss.named_parameters()]
                    if p.grad is not None}
    out["state"] = {k: v.clone() for k, v in loss.state_dict().items()}
    return out


def _rank(rank: int, world: int, tmp: str, name: str, options: dict[str, Any], n: int, steps: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    torch.save(_run(name, options, n, steps, (rank, world)), Path(tmp) / f"rank{rank}.pt")
    leave_rank()


def assert_ranks_match(name: str, steps: int = 2, n: int = 8, world: int = 2, atol: float = 1e-5,
                       **options: Any) -> dict[str, Any]:
    """``world`` gloo ranks x ``n / world`` equal one process x ``n`` over ``steps`` training steps: the loss
    of each step (mean over ranks), the last gradients (averaged over ranks) and the whole state of the
    loss (queues, centres, teachers, counters) on EVERY rank. Returns the one-process result."""
    reference = _run(name, options, n, steps, None)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank, args=(world, tmp, name, options, n, steps), nprocs=world, start_method="spawn")
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world)]
    for step in range(steps):
        got = sum(r["losses"][step] for r in ranks) / world
        assert abs(got - reference["losses"][step]) <= atol, f"step {step}: {got} != {reference['losses'][step]}"
    for key, grad in reference["grads"].items():
        got = sum(r["grads"][key] for r in ranks) / world
        torch.testing.assert_close(got, grad, rtol=0, atol=atol, msg=f"gradient of {key}")
    for r in ranks:
        assert r["state"].keys() == reference["state"].keys()
        for key, value in reference["state"].items():
            torch.testing.assert_close(r["state"][key].double(), value.double(), rtol=0, atol=atol, msg=key)
    return reference


def assert_loss_on_projector_output(cls: type) -> None:
    """Barlow Twins and VICReg bound to an encoder project each view through their MLP (Linear-BN-ReLU,
    Linear-BN-ReLU, Linear) and equal the projector-free loss of the projections; unbound, they refuse."""
    import pytest

    torch.manual_seed(0)
    encoder = nn.Linear(5, 8)
    encoder.embed_dim = 8
    loss = cls(projector=(16, 16, 4))
    loss.bind(encoder)
    linears = [m for m in loss.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(8, 16), (16, 16), (16, 4)]
    views = [encoder(torch.randn(6, 5)) for _ in range(2)]
    expected = cls(projector=())({"views": [loss.projector(v) for v in views]})["loss"]
    assert loss({"views": views})["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(RuntimeError, match="bind"):
        cls()({"views": views})
