"""The synthesised DeepSpeed config follows the trainer options."""

import pytest
import torch

from orchestrator.engine.dsconfig import deepspeed_config, effective_precision, warmup_cosine
from orchestrator.spec import resolve_trainer
from tests.engine.conftest import tiny_batch, tiny_clip


def test_batch_is_split_over_ranks_and_accumulation() -> None:
    trainer = resolve_trainer({"batch_size": "256", "gpus": "4", "accum": "2", "zero": "2", "grad_clip": "0.5"})
    config = deepspeed_config(trainer, world_size=4, precision="bf16")
    assert config["train_batch_size"] == 256
    assert config["train_micro_batch_size_per_gpu"] == 32
    assert config["gradient_accumulation_steps"] == 2
    assert config["zero_optimization"] == {"stage": 2}
    assert config["gradient_clipping"] == 0.5
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}  # fp32 weights, as AMP
    assert "bf16" not in config and "fp16" not in config


def test_schedule_warms_up_from_the_first_step_then_decays_to_zero() -> None:
    factor = warmup_cosine(warmup=4, steps=20)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == 1.0 and 0.49 < factor(12) < 0.51 and factor(20) == 0.0
    assert warmup_cosine(warmup=0, steps=3)(0) == 1.0  # no warmup: full rate at once


def test_fp32_has_no_mixed_precision_section() -> None:
    config = deepspeed_config(resolve_trainer({}), world_size=1, precision="fp32")
    assert "bf16" not in config and "fp16" not in config


def test_auto_precision_is_bf16_only_on_a_capable_gpu() -> None:
    assert effective_precision("auto", "cpu", False) == "fp32"
    assert effective_precision("auto", "cuda", True) == "bf16"
    assert effective_precision("auto", "cuda", False) == "fp32"
    assert effective_precision("fp16", "cuda", True) == "fp16"


def test_training_steps_never_wait_for_the_device(one_rank: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """DeepSpeed's throughput timer (on by default) synchronizes the device at every forward and step: the host
    then cannot queue the next kernels while the GPU works. orch turns it off and times its own steps."""
    from deepspeed.accelerator import get_accelerator

    from orchestrator.engine.train import make_engine

    model = tiny_clip()
    engine, _ = make_engine(model, resolve_trainer({"batch_size": "8", "steps": "10", "warmup": "0"}),
                            torch.device("cpu"), "fp32", world=1)
    accelerator, waits = get_accelerator(), []
    synchronize = accelerator.synchronize
    monkeypatch.setattr(accelerator, "synchronize", lambda *args: waits.append(args) or synchronize(*args))
    batch = tiny_batch()
    for _ in range(5):  # DeepSpeed's timer starts synchronizing at its third step
        engine.backward(engine(batch)["loss"])
        engine.step()
    assert waits == []
