"""A loss's ``fixed_lr_parameters()`` (SimSiam's predictor) train at the base learning rate at every step, the rest
on the warmup-cosine schedule, and a resumed run carries both on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.engine.compose import RunModel
from orchestrator.engine.dsconfig import warmup_cosine
from orchestrator.spec import resolve_trainer
from plugins.encoders.vit import VisionTransformer
from plugins.losses.simsiam import SimSiam

LR, WARMUP, STEPS = 0.01, 3, 8


def _engine(fix_pred_lr: bool, zero: int = 0) -> tuple[Any, RunModel]:
    from orchestrator.engine.train import make_engine

    torch.manual_seed(0)
    encoder = VisionTransformer(image_size=16, patch_size=8, width=32, depth=1, heads=2, embed_dim=16)
    loss = SimSiam(dim=16, pred_dim=4, fix_pred_lr=fix_pred_lr)
    loss.bind(encoder)
    model = RunModel(encoder, None, loss, {"views"})
    trainer = resolve_trainer({"batch_size": "8", "steps": str(STEPS), "warmup": str(WARMUP), "lr": str(LR),
                               "zero": str(zero)})
    engine, _ = make_engine(model, trainer, torch.device("cpu"), "fp32", world=1)
    return engine, model


def _train(engine: Any, steps: range) -> list[list[float]]:
    """Train the given steps (a batch each, from the step number); the learning rate of every group at each step."""
    used: list[list[float]] = []
    torch_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # inside DeepSpeed's ZeRO wrapper
    hook = torch_optimizer.register_step_pre_hook(lambda opt, *_: used.append([g["lr"] for g in opt.param_groups]))
    for step in steps:
        generator = torch.Generator().manual_seed(step)
        engine.backward(engine({"views": [torch.rand(8, 3, 16, 16, generator=generator) for _ in range(2)]})["loss"])
        engine.step()
    hook.remove()
    return used


@pytest.mark.parametrize("zero", [0, 1])
def test_the_predictor_keeps_the_base_rate_and_the_rest_follows_the_schedule(one_rank: None, zero: int) -> None:
    engine, model = _engine(fix_pred_lr=True, zero=zero)
    groups = engine.optimizer.param_groups
    assert [g["weight_decay"] > 0 for g in groups] == [True, False, True, False]  # biases and norms: no decay
    if zero == 0:  # ZeRO flattens each group's parameters into one partition
        predictor = {id(p) for p in model.loss.predictor.parameters()}
        assert [{id(p) for p in g["params"]} <= predictor for g in groups] == [False, False, True, True]
        assert set().union(*({id(p) for p in g["params"]} for g in groups[2:])) == predictor
        assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])

    used = _train(engine, range(STEPS))
    schedule = [LR * warmup_cosine(WARMUP, STEPS)(k) for k in range(STEPS)]
    assert [lr for lrs in used for lr in lrs] == pytest.approx([lr for s in schedule for lr in (s, s, LR, LR)])
    assert min(schedule) < LR / 2  # the schedule did move away from the base rate


def test_without_fixed_parameters_every_group_follows_the_schedule(one_rank: None) -> None:
    engine, _ = _engine(fix_pred_lr=False)
    used = _train(engine, range(STEPS))
    schedule = [LR * warmup_cosine(WARMUP, STEPS)(k) for k in range(STEPS)]
    assert [lr for lrs in used for lr in lrs] == pytest.approx([lr for s in schedule for lr in (s, s)])


def test_a_resumed_run_keeps_both_rates_and_trains_as_the_uninterrupted_one(one_rank: None, tmp_path: Path) -> None:
    engine, model = _engine(fix_pred_lr=True)
    used = _train(engine, range(STEPS))
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    engine, _ = _engine(fix_pred_lr=True)
    _train(engine, range(STEPS // 2))
    engine.save_checkpoint(str(tmp_path), tag="half")
    engine, model = _engine(fix_pred_lr=True)
    engine.load_checkpoint(str(tmp_path), tag="half")
    resumed = _train(engine, range(STEPS // 2, STEPS))
    assert [lr for lrs in resumed for lr in lrs] == pytest.approx([lr for lrs in used[STEPS // 2:] for lr in lrs])
    for resumed, reference in zip(model.parameters(), uninterrupted):
        torch.testing.assert_close(resumed, reference, rtol=1e-6, atol=1e-7)
