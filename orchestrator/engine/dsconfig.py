"""Synthesise the DeepSpeed config and the learning-rate and weight-decay schedules from the trainer options."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def effective_precision(requested: str, device_type: str, bf16_supported: bool) -> str:
    if requested != "auto":
        return requested
    return "bf16" if device_type == "cuda" and bf16_supported else "fp32"


def clips_outside_deepspeed(trainer: dict[str, Any], precision: str) -> bool:
    """Whether orch clips the gradients itself, with torch's multi-tensor ``clip_grad_norm_``, just before the
    optimizer step. At ZeRO-0 without loss scaling the optimizer is the plain torch one and the full, unscaled
    gradients are in ``.grad``; DeepSpeed's own clip there norms each parameter in a Python loop and waits for the
    GPU: 5.7 ms of a 19 ms step of the default model on one H100 (bench/overhead.py). ZeRO 1-3 (partitioned
    gradients) and fp16 (scaled gradients) keep DeepSpeed's."""
    return trainer["grad_clip"] > 0 and trainer["zero"] == 0 and precision != "fp16"


def deepspeed_config(trainer: dict[str, Any], world_size: int, precision: str) -> dict[str, Any]:
    micro = trainer["batch_size"] // (world_size * trainer["accum"])
    config: dict[str, Any] = {
        "train_batch_size": trainer["batch_size"],
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": trainer["accum"],
        "gradient_clipping": 0.0 if clips_outside_deepspeed(trainer, precision) else trainer["grad_clip"],
        "zero_optimization": {"stage": trainer["zero"]},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on by default and synchronizes the device at every forward and every
        # step, so the host cannot queue the next step's kernels while the GPU runs; orch times its own steps
        "timers": {"throughput": {"enabled": False}},
    }
    if precision == "bf16":
        # Autocast with fp32 weights, as an AMP loop, not DeepSpeed's bf16 mode: on one H100 the latter ran
        # CLIP ViT-B/16 at 0.68x of open_clip's loop (0.41x at ZeRO-1/2), this mode at 1.04x (engineering notes).
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def warmup_cosine(warmup: int, steps: int) -> Callable[[int], float]:
    """The LR multiplier after ``step`` optimizer steps: linear warmup then cosine decay to 0, as open_clip's
    ``cosine_lr`` (the first step already trains at lr/warmup; DeepSpeed's WarmupCosineLR starts at 0)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def weight_decay_at(trainer: dict[str, Any], step: int) -> float:
    """The weight decay of the optimizer step after ``step`` steps: ``weight_decay`` throughout, or with
    ``weight_decay_end`` a cosine from one to the other over the run, as DINO's ``cosine_scheduler`` (Caron et
    al. 2021: 0.04 to 0.4; iBOT and DINOv2 keep it)."""
    start, end = trainer["weight_decay"], trainer.get("weight_decay_end")  # specs queued before it have none
    if end is None:
        return start
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * min(step / trainer["steps"], 1.0)))
