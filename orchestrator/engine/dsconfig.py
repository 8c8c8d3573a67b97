"""Synthesise the DeepSpeed config from the trainer options: users never write JSON."""

from __future__ import annotations

from typing import Any


def effective_precision(requested: str, device_type: str, bf16_supported: bool) -> str:
    if requested != "auto":
        return requested
    return "bf16" if device_type == "cuda" and bf16_supported else "fp32"


def deepspeed_config(trainer: dict[str, Any], world_size: int, precision: str) -> dict[str, Any]:
    micro = trainer["batch_size"] // (world_size * trainer["accum"])
    config: dict[str, Any] = {
        "train_batch_size": trainer["batch_size"],
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": trainer["accum"],
        "gradient_clipping": trainer["grad_clip"],
        "zero_optimization": {"stage": trainer["zero"]},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": trainer["steps"],
                "warmup_num_steps": max(1, trainer["warmup"]),  # DeepSpeed refuses 0; 1 step is no warmup
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": 0.0,
                "warmup_type": "linear",
            },
        },
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config
