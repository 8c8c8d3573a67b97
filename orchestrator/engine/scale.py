"""The scale options applied to a built model (activation checkpointing, ``torch.compile``), and the loss's
``after_step`` run on the weights the optimizer really updates (fp32 masters; gathered under ZeRO-3).

Kept apart from ``train.py`` so that the benches build exactly the model a run trains.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orchestrator.errors import UserError


def towers(model: nn.Module, spec: dict[str, Any] | None = None) -> list[tuple[str, nn.Module]]:
    """The distinct encoders of a run model, each with the name the user chose it by (``--encoder vit``)."""
    spec = spec or {}
    named = [(_name(spec, "encoder", model.image_encoder), model.image_encoder)]
    text = getattr(model, "text_encoder", None)
    if text is not None and text is not model.image_encoder:
        named.append((_name(spec, "text_encoder", text), text))
    return named


def _name(spec: dict[str, Any], slot: str, module: nn.Module) -> str:
    entry = spec.get(slot)
    return entry["name"] if entry else type(module).__name__


def prepare(model: nn.Module, trainer: dict[str, Any], spec: dict[str, Any] | None = None) -> None:
    """Apply ``activation_checkpointing`` and ``compile`` to the encoders, before DeepSpeed wraps the model.

    ``Module.compile()`` compiles in place, so parameter names, checkpoints and final weights are unchanged;
    the loss stays eager (its all-gathers would break the graph anyway)."""
    if trainer.get("activation_checkpointing"):
        for name, encoder in towers(model, spec):
            if not callable(getattr(encoder, "set_grad_checkpointing", None)):
                raise UserError(f"--activation-checkpointing: encoder {name} has no set_grad_checkpointing(); "
                                f"drop the flag or choose an encoder that offers it")
            encoder.set_grad_checkpointing(True)
    if trainer.get("compile"):
        if trainer.get("zero") == 3:
            raise UserError("--compile with --zero 3 is not supported (ZeRO-3 gathers parameters in hooks that "
                            "torch.compile does not trace): use --zero 2 or drop --compile")
        for _, encoder in towers(model, spec):
            encoder.compile()


def run_after_step(loss: nn.Module, optimizer: Any = None) -> None:
    """``loss.after_step()`` (open_clip's clamp of the learnable temperature) where it sticks.

    With bf16/fp16 engines and with ZeRO 1-3, DeepSpeed keeps fp32 master copies and writes them over the
    module's parameters after every step: a clamp of the module's copy alone would be undone by the next step
    while the master drifted past the bound. So each trainable parameter that has a master is swapped for it
    while ``after_step`` runs, and the result written to both. Under ZeRO-3 the loss's parameters are gathered
    first (every rank runs this; rank 0's result is kept). Plain fp32 ZeRO-0 has no master: the module's
    parameters are the optimizer's, and this is ``loss.after_step()``. ``optimizer`` is ``engine.optimizer``."""
    if not hasattr(loss, "after_step"):
        return
    params = list(loss.parameters())
    copies = _fp32_copies(optimizer)
    partitioned = any(hasattr(p, "ds_id") for p in params)
    if not (partitioned or any(id(p) in copies or hasattr(p, "_hp_mapping") for p in params)):
        loss.after_step()
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=partitioned):
        swapped = []
        for p in params:
            if p.requires_grad and (master := _master(p, copies)) is not None:
                swapped.append((p, p.data))
                p.data = master.detach().clone().reshape(p.data.shape)
        try:
            loss.after_step()
        finally:
            for p, working in swapped:
                with torch.no_grad():
                    if id(p) in copies:
                        copies[id(p)].copy_(p.data.reshape(copies[id(p)].shape))
                    else:
                        _set_master(p, p.data)
                    working.copy_(p.data)
                p.data = working


def fp32_master(param: nn.Parameter, optimizer: Any = None) -> torch.Tensor | None:
    """The full fp32 master DeepSpeed keeps of ``param`` (None where the parameter is its own master)."""
    return _master(param, _fp32_copies(optimizer))


def _fp32_copies(optimizer: Any) -> dict[int, torch.Tensor]:
    """Per-parameter fp32 copies of DeepSpeed's ZeRO-0 bf16/fp16 optimizer (``FP16_UnfusedOptimizer``, used with
    a torch optimizer), by the id of the low-precision parameter; empty for every other optimizer."""
    lows, highs = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not lows or not highs:
        return {}
    return {id(low): high for low_group, high_group in zip(lows, highs) for low, high in zip(low_group, high_group)
            if isinstance(high, torch.Tensor) and high.shape == low.shape and not hasattr(low, "ds_id")}


def _master(param: nn.Parameter, copies: dict[int, torch.Tensor]) -> torch.Tensor | None:
    if id(param) in copies:
        return copies[id(param)]
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):  # ZeRO 1-3 and DeepSpeed's BF16_Optimizer
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param)  # a collective: every rank asks
    return None


def _set_master(param: nn.Parameter, value: torch.Tensor) -> None:
    """Write a full value into DeepSpeed's fp32 master. For ZeRO-3 this rank's slice of the zero-padded value
    goes to its partition: ``safe_set_full_fp32_param`` cannot take a parameter smaller than the world (a [1]
    temperature over 2 ranks: "start (1) + length (1) exceeds dimension size (1)", DeepSpeed 0.19.8)."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_full_fp32_param, safe_set_local_fp32_param

    if not hasattr(param, "ds_id"):
        safe_set_full_fp32_param(param, value)
        return

    local = safe_get_local_fp32_param(param)
    group = getattr(param, "ds_process_group", None)
    rank, size = dist.get_rank(group=group), local.numel()
    padded = torch.zeros(size * dist.get_world_size(group=group), dtype=local.dtype, device=local.device)
    padded[: value.numel()] = value.detach().flatten().to(padded)
    safe_set_local_fp32_param(param, padded[rank * size:(rank + 1) * size])
