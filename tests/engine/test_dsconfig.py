"""The synthesised DeepSpeed config follows the trainer options."""

import re

import pytest
import torch

from orchestrator.engine.dsconfig import deepspeed_config, effective_precision, warmup_cosine
from orchestrator.errors import UserError
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


@pytest.mark.parametrize(("requested", "device", "bf16", "says"), [
    ("fp16", "cpu", False, "--precision fp16 needs a GPU"),
    ("bf16", "cuda", False, "--precision bf16 needs a GPU with bf16"),
])
def test_a_precision_the_device_lacks_is_the_users_to_change(requested: str, device: str, bf16: bool,
                                                             says: str) -> None:
    with pytest.raises(UserError, match=says):
        effective_precision(requested, device, bf16)
    assert effective_precision("bf16", "cpu", False) == "bf16"  # DeepSpeed's CPU accelerator trains in bf16


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


def test_deepspeed_overrides_lay_over_the_synthesised_config() -> None:
    trainer = resolve_trainer({"zero": "2", "deepspeed": "zero_optimization.overlap_comm=true,"
                               "zero_optimization.reduce_bucket_size=5e7,wall_clock_breakdown=true"})
    config = deepspeed_config(trainer, world_size=1, precision="bf16")
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 5e7}
    assert config["wall_clock_breakdown"] is True  # orch's False replaced
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}  # the rest as synthesised
    assert deepspeed_config(resolve_trainer({"zero": "2"}), 1, "bf16")["zero_optimization"] == {"stage": 2}


def test_an_optimizer_offload_at_zero_0_is_refused() -> None:
    with pytest.raises(UserError, match="at --zero 1, 2 or 3 only"):
        resolve_trainer({"zero": "0", "deepspeed": "zero_optimization.offload_optimizer.device=cpu,"
                                                   "zero_force_ds_cpu_optimizer=false"})
    assert resolve_trainer({"zero": "1", "deepspeed": "zero_optimization.offload_optimizer.device=cpu,"
                                                      "zero_force_ds_cpu_optimizer=false"})["deepspeed"]


@pytest.mark.parametrize("overrides, message", [
    ("zero_optimization.stage=3", "orch sets zero_optimization.stage from --zero"),
    ('zero_optimization={"stage":3}', "orch sets zero_optimization.stage from --zero"),
    ("zero_optimization=true", "orch sets zero_optimization.stage from --zero"),  # DeepSpeed's old spelling of 1
    ("checkpoint=null", "orch sets checkpoint.load_universal from orch resume"),
    ("train_micro_batch_size_per_gpu=4", "from --batch-size, --gpus and --accum"),
    ("bf16.enabled=true", "orch sets bf16 from --precision"),
    ("optimizer.type=Lamb", "orch sets optimizer from --lr and --weight-decay"),
    ("zero_optimisation.overlap_comm=true", "DeepSpeed reads no such key (did you mean zero_optimization?)"),
    ("no_such_section.x=1", "--deepspeed no_such_section: DeepSpeed reads no such key"),
    ("zero_optimization.overlap_com=true", "DeepSpeedZeroConfig overlap_com: Extra inputs are not permitted"),
    ("zero_optimization.reduce_bucket_size=lots", "DeepSpeedZeroConfig reduce_bucket_size: Input should be"),
    ("zero_optimization.offload_optimizer.device=cpu", "only with zero_force_ds_cpu_optimizer=false as well"),
])
def test_overrides_that_orch_sets_or_deepspeed_would_not_read_are_refused(overrides: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        resolve_trainer({"zero": "2", "deepspeed": overrides})


def test_any_value_of_any_key_deepspeed_reads_is_accepted_or_refused_in_one_line() -> None:
    """DeepSpeed's parser fails in its own ways on odd values (``aio=5``: an AttributeError; a removed section: its
    DeepSpeedConfigError): each must come out as a UserError, never a traceback."""
    from deepspeed.runtime.config import DeepSpeedConfig

    from orchestrator.engine.dsconfig import _ReadKeys

    read: set[str] = set()
    DeepSpeedConfig(_ReadKeys(deepspeed_config(resolve_trainer({}), 1, "fp32"), read))
    assert len(read) > 40 and "zero_optimization" in read
    for key in sorted(read):
        for value in ("5", "x", "[1]", "true", '{"a":1}', "null"):
            try:
                resolve_trainer({"zero": "2", "deepspeed": f"{key}={value}"})
            except UserError as exc:
                assert "\n" not in str(exc), (key, value)


def test_the_engine_trains_with_the_overrides(one_rank: None) -> None:
    """Through the engine every run trains with: DeepSpeed's ZeRO-2 optimizer reads the overridden keys."""
    from orchestrator.engine.train import make_engine

    trainer = resolve_trainer({"batch_size": "8", "steps": "10", "warmup": "0", "zero": "2", "deepspeed":
                               "zero_optimization.overlap_comm=true,zero_optimization.reduce_bucket_size=4096"})
    engine, _ = make_engine(tiny_clip(), trainer, torch.device("cpu"), "fp32", world=1)
    assert engine.zero_overlap_comm() is True and engine.zero_reduce_bucket_size() == 4096
    assert engine.optimizer.overlap_comm is True and engine.optimizer.reduce_bucket_size == 4096
    before = [p.detach().clone() for p in engine.module.parameters()]
    engine.backward(engine(tiny_batch())["loss"])
    engine.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
