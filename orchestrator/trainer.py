"""The trainer's settings: every one a command-line flag of ``orch queue`` and ``orch run``.

Read from ``trainer``'s signature, with no plugin machinery, so that building the CLI stays cheap.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Literal

from orchestrator.options import Option


def trainer(
    steps: int = 500,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    weight_decay_end: float | None = None,
    warmup: int | None = None,
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    zero: Literal[0, 1, 2, 3] = 0,
    gpus: int | Literal["all"] = 1,
    accum: int = 1,
    grad_clip: float = 1.0,
    seed: int = 0,
    checkpoint_every: int = 100,
    eval_every: int = 0,
    log_every: int = 10,
    workers: int = 0,
    grad_cache: int = 0,
    prefetch: int = 2,
    activation_checkpointing: bool = False,
    compile: bool = False,
    deepspeed: dict[str, Any] | None = None,
) -> None:
    """Trainer settings: every one is a command-line flag (``--batch-size``) with this default.

    ``batch_size`` is the global batch (all ranks, all accumulation steps), as papers report it.
    ``gpus`` is the number of training processes: one per GPU, or gloo processes on a CPU-only machine;
    ``all`` takes every GPU of the worker that runs it (``orch worker --gpus``), decided at launch.
    ``precision=auto`` trains in bf16 on GPUs that support it and in fp32 on the CPU.
    ``warmup`` (linear, then cosine decay to 0) defaults to a tenth of ``steps``.
    ``weight_decay_end`` turns the weight decay into a cosine from ``weight_decay`` to it over the run (DINO).
    ``workers`` is the number of data-loading processes per rank (0 loads in the training process); they live
    for the whole attempt, each keeping ``prefetch`` micro-batches ready.
    ``activation_checkpointing`` recomputes the encoders' activations in the backward pass (less memory, about
    a third more compute); ``compile`` runs the encoders' forward through ``torch.compile``.
    ``eval_every=0`` evaluates at the end only; ``checkpoint_every=0`` checkpoints at the end only.
    ``grad_cache`` (samples, 0 = off) encodes each micro-batch in chunks of that many samples and caches the
    embedding gradients (GradCache, Gao et al. 2021): the same step with the activation memory of one chunk.
    ``deepspeed`` sets keys of the DeepSpeed config that orch does not derive from the options above
    (``zero_optimization.overlap_comm=true,zero_optimization.reduce_bucket_size=5e8``): values are JSON, else text.
    """


def _trainer_options() -> list[Option]:
    hints = typing.get_type_hints(trainer)
    return [Option(p.name, hints[p.name], p.default) for p in inspect.signature(trainer).parameters.values()]


TRAINER_OPTIONS: list[Option] = _trainer_options()

