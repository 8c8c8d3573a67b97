"""The parts of DeepSpeed's ZeRO-0 step that orch does itself. Gradient clipping: orch clips with torch's
multi-tensor ``clip_grad_norm_`` inside ``engine.step()`` (DeepSpeed's own clip is a per-parameter Python loop that
waits for the GPU); ZeRO 1-3 keep DeepSpeed's. Both must give the same training. Clearing the gradients: the
optimizer's ``zero_grad`` at the accumulation boundary, not a walk of every module's parameters."""

from __future__ import annotations

import pytest
import torch

from orchestrator.engine.dsconfig import clips_outside_deepspeed, deepspeed_config
from orchestrator.spec import resolve_trainer
from tests.engine.conftest import tiny_batch, tiny_clip


def test_only_zero_0_without_loss_scaling_clips_outside_deepspeed() -> None:
    for zero, precision, outside in ((0, "fp32", True), (0, "bf16", True), (0, "fp16", False), (1, "fp32", False),
                                     (2, "bf16", False), (3, "fp32", False)):
        trainer = resolve_trainer({"zero": str(zero), "grad_clip": "0.5"})
        assert clips_outside_deepspeed(trainer, precision) is outside, (zero, precision)
        assert deepspeed_config(trainer, 1, precision)["gradient_clipping"] == (0.0 if outside else 0.5)
    assert not clips_outside_deepspeed(resolve_trainer({"grad_clip": "0"}), "fp32")


def _train(zero: int, accum: int, steps: int = 3) -> tuple[list[float], list[torch.Tensor]]:
    """``steps`` optimizer steps with a clip far below the gradient norm, so that every step is clipped; returns
    the gradient norm the optimizer saw at each step and the final parameters."""
    from orchestrator.engine.train import make_engine

    torch.manual_seed(0)
    model = tiny_clip()
    trainer = resolve_trainer({"batch_size": str(8 * accum), "accum": str(accum), "zero": str(zero),
                               "grad_clip": "0.01", "steps": "10", "warmup": "0", "lr": "0.01"})
    engine, _ = make_engine(model, trainer, torch.device("cpu"), "fp32", world=1)
    seen: list[float] = []
    if zero == 0:  # after orch's clip (hooks run in the order registered)
        params = [p for p in model.parameters() if p.requires_grad]
        engine.optimizer.register_step_pre_hook(
            lambda *_: seen.append(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
                                   .item()))
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps * accum):
        batch = tiny_batch(generator=generator)
        engine.backward(engine(batch)["loss"])
        engine.step()
    return seen, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("accum", [1, 2])
def test_orch_clip_at_zero_0_trains_as_deepspeeds_clip_at_zero_1(one_rank: None, accum: int) -> None:
    seen, clipped_by_orch = _train(zero=0, accum=accum)
    _, clipped_by_deepspeed = _train(zero=1, accum=accum)
    assert len(seen) == 3  # once per optimizer step, not per micro-batch
    assert seen == pytest.approx([0.01] * 3, rel=1e-4)
    # The two norms sum in different orders (torch's per-tensor norms, DeepSpeed's flat buffer), so the clip
    # coefficients differ in their last bits and AdamW carries that into its updates: measured up to 1.4e-6 after
    # three steps on an Intel Xeon (under 1e-6 on the AMD EPYC machines before it), on parameters that move by 0.03.
    # A clip 1% off (0.0101) moves them by 5e-4, so 1e-5 still tells a wrong clip from rounding.
    for a, b in zip(clipped_by_orch, clipped_by_deepspeed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_zero_0_clears_the_gradients_at_the_accumulation_boundary_only(one_rank: None) -> None:
    from orchestrator.engine.train import make_engine

    model = tiny_clip()
    trainer = resolve_trainer({"batch_size": "16", "accum": "2", "steps": "10", "warmup": "0"})
    engine, _ = make_engine(model, trainer, torch.device("cpu"), "fp32", world=1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batch = tiny_batch()
    engine.backward(engine(batch)["loss"])
    engine.step()  # the first micro-batch: its gradients wait for the second
    first = [p.grad.clone() for p in trainable]
    engine.backward(engine(batch)["loss"])
    assert all(torch.allclose(p.grad, 2 * g) for p, g in zip(trainable, first))  # accumulated, not replaced
    engine.step()
    assert all(p.grad is None for p in trainable)
