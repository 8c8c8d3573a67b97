"""Synthesise the DeepSpeed config and the learning-rate and weight-decay schedules from the trainer options."""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Callable, KeysView
from typing import Any

from orchestrator.errors import UserError
from orchestrator.options import leaves, mapping_text

# DeepSpeed keys orch derives from its own options, and the option to use instead: an override would contradict the
# spec (the sampler cuts micro-batches from --batch-size, orch builds the optimizer and the schedule itself).
SET_BY_ORCH = {
    "train_batch_size": "--batch-size",
    "train_micro_batch_size_per_gpu": "--batch-size, --gpus and --accum",
    "gradient_accumulation_steps": "--accum",
    "gradient_clipping": "--grad-clip",
    "zero_optimization.stage": "--zero",
    "fp16": "--precision",
    "bf16": "--precision",
    "bfloat16": "--precision",
    "torch_autocast": "--precision",
    "amp": "--precision",
    "optimizer": "--lr and --weight-decay (orch builds torch's AdamW)",
    "scheduler": "--warmup and --steps (orch's warmup-cosine schedule)",
    "compile": "--compile",
    "checkpoint.load_universal": "orch resume (orch sets it for a checkpoint saved at another world size)",
}


def effective_precision(requested: str, device_type: str, bf16_supported: bool) -> str:
    """The precision a run trains in on this device. One the device lacks is the user's to change, not a crash to
    retry (DeepSpeed's own error came three times, once per attempt)."""
    if requested == "fp16" and device_type != "cuda":
        raise UserError(f"--precision fp16 needs a GPU (DeepSpeed's loss-scaled fp16); this worker trains on the "
                        f"{device_type.upper()}: use --precision auto, fp32 or bf16")
    if requested == "bf16" and device_type == "cuda" and not bf16_supported:
        raise UserError("--precision bf16 needs a GPU with bf16 (Ampere or newer); this worker's has none: use "
                        "--precision fp16, or auto (fp32 there)")
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
    return merged(config, trainer.get("deepspeed") or {})  # specs queued before --deepspeed have no key


def merged(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``overrides`` laid over it: sections merge key by key, other values are replaced."""
    out = dict(config)
    for key, value in overrides.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if both else value
    return out


def check_overrides(trainer: dict[str, Any]) -> None:
    """Refuse, in one line, a ``--deepspeed`` key that orch sets itself, a top-level key DeepSpeed never reads (it
    ignores those silently: a typo would change nothing), anything DeepSpeed's own config validation refuses, and
    an optimizer offload that DeepSpeed would refuse when the engine starts (it wants its own CPU Adam)."""
    overrides = trainer["deepspeed"]
    for path, value in leaves(overrides):
        key = ".".join(path)
        for reserved, flag in SET_BY_ORCH.items():
            inside = key == reserved or key.startswith(reserved + ".")
            replaces = reserved.startswith(key + ".") and not isinstance(value, dict)  # zero_optimization=true
            if inside or replaces:
                raise UserError(f"--deepspeed {key}: orch sets {reserved} from {flag}; use that instead")
    read: set[str] = set()
    config = _ReadKeys(deepspeed_config(trainer, world_size=1, precision="fp32"), read)

    def quiet(record: logging.LogRecord) -> bool:  # DeepSpeed's import warns on a CPU machine that it found no GPU
        return record.levelno >= logging.ERROR

    logging.getLogger("DeepSpeed").addFilter(quiet)
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
        from pydantic import ValidationError

        try:
            parsed = DeepSpeedConfig(config)
        except ValidationError as exc:
            where = "; ".join(f"{exc.title} {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise UserError(f"--deepspeed {mapping_text(overrides)}: DeepSpeed refuses it ({where})") from None
        except Exception as exc:  # every failure of the parser is about the user's keys: a section that is not a
            # mapping (AttributeError), a key DeepSpeed removed (DeepSpeedConfigError), a failed assertion
            first = (str(exc).strip().splitlines() or [""])[0]
            raise UserError(f"--deepspeed {mapping_text(overrides)}: DeepSpeed refuses it "
                            f"({type(exc).__name__}: {first})") from None
    finally:
        logging.getLogger("DeepSpeed").removeFilter(quiet)
    for key in overrides:
        if key not in read:
            near = difflib.get_close_matches(key, read, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]}?" if near else "see DeepSpeed's config reference"
            raise UserError(f"--deepspeed {key}: DeepSpeed reads no such key ({hint})")
    offload = parsed.zero_config.offload_optimizer
    if offload is None or offload.device == "none":
        return
    if not parsed.zero_enabled:
        raise UserError(f"--deepspeed zero_optimization.offload_optimizer.device={offload.device}: DeepSpeed offloads "
                        f"the optimizer at --zero 1, 2 or 3 only (at 0 it ignores the key): raise --zero")
    if parsed.zero_force_ds_cpu_optimizer:
        raise UserError(f"--deepspeed zero_optimization.offload_optimizer.device={offload.device}: DeepSpeed steps "
                        f"orch's optimizer (torch's AdamW) off the GPU only with zero_force_ds_cpu_optimizer=false "
                        f"as well: add it")


class _ReadKeys(dict):
    """A config that records the top-level keys DeepSpeed reads: by ``get``, ``[]``, ``in`` or ``in .keys()``."""

    def __init__(self, config: dict[str, Any], read: set[str]) -> None:
        super().__init__(config)
        self.read = read  # shared with the copy DeepSpeed makes (copy.copy keeps the instance's __dict__)

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self.read.add(key)
        return super().__contains__(key)

    def keys(self) -> KeysView:
        return _ReadKeysView(self)


class _ReadKeysView(KeysView):
    def __contains__(self, key: Any) -> bool:
        return key in self._mapping


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
