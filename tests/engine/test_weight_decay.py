"""``--weight-decay-end``: DINO's cosine weight-decay schedule (Caron et al. 2021), applied by the real DeepSpeed
engine at every ZeRO stage that keeps the torch optimizer's groups, to the matrices only, and logged."""

from __future__ import annotations

import math

import pytest
import torch

from orchestrator.engine.dsconfig import weight_decay_at
from orchestrator.spec import resolve_trainer
from orchestrator.store import Store
from tests.conftest import orch
from tests.engine.conftest import tiny_batch, tiny_clip


def test_the_schedule_runs_from_weight_decay_to_weight_decay_end() -> None:
    trainer = resolve_trainer({"weight_decay": "0.04", "weight_decay_end": "0.4", "steps": "100"})
    assert weight_decay_at(trainer, 0) == pytest.approx(0.04)
    assert weight_decay_at(trainer, 50) == pytest.approx(0.22)
    assert weight_decay_at(trainer, 25) == pytest.approx(0.4 - 0.18 * (1 + math.cos(math.pi / 4)))
    assert weight_decay_at(trainer, 100) == pytest.approx(0.4)
    constant = resolve_trainer({"weight_decay": "0.04", "steps": "100"})
    assert constant["weight_decay_end"] is None and weight_decay_at(constant, 60) == 0.04


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_each_step_decays_the_matrices_by_lr_times_the_scheduled_decay(one_rank: None, zero: int) -> None:
    """With zero gradients an AdamW step is the decay alone: ``p <- p (1 - lr_k wd_k)`` on matrices, nothing on
    biases and norms. So the ratio of consecutive parameters shows which decay each step applied."""
    import deepspeed

    from orchestrator.engine.train import make_engine

    torch.manual_seed(0)
    model = tiny_clip()
    steps = 4
    trainer = resolve_trainer({"batch_size": "8", "zero": str(zero), "steps": str(steps), "warmup": "0",
                               "lr": "0.1", "weight_decay": "0.04", "weight_decay_end": "0.4"})
    engine, _ = make_engine(model, trainer, torch.device("cpu"), "fp32", world=1)
    shapes = {p: getattr(p, "ds_shape", p.shape) for p in model.image_encoder.parameters()}  # ZeRO-3 partitions
    matrix = next(p for p, shape in shapes.items() if len(shape) >= 2)
    bias = next(p for p, shape in shapes.items() if len(shape) == 1)

    def values() -> tuple[torch.Tensor, torch.Tensor]:
        with deepspeed.zero.GatheredParameters([matrix, bias], enabled=zero == 3):
            return matrix.detach().clone(), bias.detach().clone()

    batch = tiny_batch()
    for k in range(steps):
        before_matrix, before_bias = values()
        engine.backward(engine(batch)["loss"] * 0)
        engine.step()
        lr = 0.1 * 0.5 * (1 + math.cos(math.pi * k / steps))
        after_matrix, after_bias = values()
        torch.testing.assert_close(after_matrix, before_matrix * (1 - lr * weight_decay_at(trainer, k)),
                                   rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(after_bias, before_bias, rtol=0, atol=0)
    assert weight_decay_at(trainer, 1) > weight_decay_at(trainer, 0)  # the steps above did differ


def test_a_run_logs_the_decay_it_applied(workdir) -> None:  # noqa: ANN001 - the fixture
    result = orch("run", "--encoder", "vit:depth=1,width=32,heads=2,embed_dim=32", "--text-encoder",
                  "text-transformer:depth=1,width=32,heads=2,embed_dim=32", "--batch-size", "32", "--steps", "4",
                  "--log-every", "2", "--weight-decay", "0.04", "--weight-decay-end", "0.4", "--eval",
                  "zs:split=test", "--quiet", cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    logged = {m["step"]: m["value"] for m in store.metrics(1) if m["name"] == "train/weight_decay"}
    trainer = store.run(1)["spec"]["trainer"]
    assert trainer["weight_decay_end"] == 0.4
    assert logged == pytest.approx({2: weight_decay_at(trainer, 1), 4: weight_decay_at(trainer, 3)})
