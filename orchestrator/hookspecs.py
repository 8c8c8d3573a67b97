"""The whole plugin contract of orch, in one file.

A plugin is a module named by an entry point in the ``orch`` group. It implements some of the hooks
below with ``@hookimpl``. Built-in components live in ``plugins/`` and are registered the same way.

Registration hooks receive a ``register`` callback::

    register(name, component, **declared)

``component`` is a class or factory, or a ``"module:attribute"`` string. Prefer the string: orch then
reads the options from the source without importing the module, so ``orch plugins`` and ``orch queue``
stay fast (no torch import). The component's keyword parameters, with type hints and defaults, ARE its
options; the first line of its docstring is the summary shown by ``orch plugins``. ``declared`` says
what the component provides or needs (see each hook), so that a composition is checked at queue time.
Every kind also accepts ``resolve=callable(options) -> options``: a light (torch-free) function run at
queue time that may fill options from the environment and raise ``orchestrator.errors.UserError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from pathlib import Path

    from orchestrator.runinfo import RunInfo

hookspec = pluggy.HookspecMarker("orch")
hookimpl = pluggy.HookimplMarker("orch")


@hookspec
def register_datasets(register: Any) -> None:
    """Register datasets: ``register(name, component, provides={"image", "text", "label"})``.

    ``provides`` may instead be a light function of the resolved options returning that set (a dataset
    whose labels come from an optional column provides ``label`` only when the column is named).

    Built with its options, a dataset has ``train`` and ``test`` splits (fixed, held out), each a
    sequence whose items are dicts with the provided keys: ``image`` a float tensor C x H x W in [0, 1],
    ``text`` a caption ``str``, ``label`` an ``int``. A split with labels has ``labels`` (a list of ints).
    A labelled dataset has ``class_names`` and ``templates`` (prompt format strings with ``{}``).
    """


@hookspec
def register_encoders(register: Any) -> None:
    """Register encoders: ``register(name, component, modality="image" | "text" | "both", tokens=False)``.

    Built with its options, an encoder is an ``nn.Module`` whose ``forward`` returns embeddings
    ``[B, embed_dim]`` (not normalised; ``embed_dim`` is an option and an attribute). An image encoder
    has ``transform`` (applied to each image tensor; picklable, for data-loading workers); a text encoder
    has ``tokenize(list[str]) -> LongTensor``.
    An encoder of modality ``both`` has both and takes ``forward(x, modality=...)``.

    Optional, each used by the engine when present:

    - ``tokens=True`` declares ``forward_tokens(x) -> (tokens [B, T, embed_dim], mask [B, T] bool)``: the
      projected per-token features (mask True on real tokens), for token-wise losses (FILIP).
    - ``nested_dims`` (a tuple of widths, Matryoshka; Kusupati et al. 2022): the loss is computed on each
      prefix ``[..., :d]`` of the embeddings and averaged.
    - ``set_grad_checkpointing(enabled: bool)``: recompute activations in the backward pass
      (``--activation-checkpointing``).
    - ``representation(images) -> [B, width]``: the image representation before the projection head, which
      evaluators read with ``representation=backbone`` (the SimCLR and DINO protocol for self-supervised runs).
    """


@hookspec
def register_losses(register: Any) -> None:
    """Register losses: ``register(name, component, needs={"image", "text"})`` (or ``{"image", "label"}``...).

    Built with its options, a loss is an ``nn.Module`` (it may own parameters) whose
    ``forward(batch)`` takes a dict of embeddings (``image``, ``text``) and of ``label`` as needed, and
    returns a dict with ``loss`` and other scalar tensors worth logging (each is averaged and logged).
    With several ranks it gathers what it must with gradients (``orchestrator.distributed.gather_with_grad``),
    so that 2 ranks x batch B equal 1 rank x batch 2B. An optional ``after_step()`` runs after each
    optimizer step (clamps, EMA updates). An optional ``fixed_lr_parameters()`` names parameters the
    engine keeps at the base learning rate, outside the warmup-cosine schedule (SimSiam's predictor).

    A loss that learns from augmented views of each image declares ``needs={"views"}`` (plus ``label``
    if it uses labels) and has ``views``: a list of picklable callables, each mapping a raw image
    (C x H x W floats in [0, 1]) to one augmented view; the encoder's ``transform`` is applied after it.
    Its batch then holds ``views`` (V embedding tensors ``[B, D]``, row i of each is sample i) and
    ``view_inputs`` (the V encoder inputs, for teachers). The augmentation of a sample is a function
    of (seed, epoch, sample index, view): the same on every rank and worker count, and on resume.
    A loss that needs the image tower (momentum encoders, EMA teachers) has ``bind(encoder)``, called
    once before training: it keeps the encoder without registering it as a submodule
    (``self.__dict__["student"] = encoder``) and deep-copies it as a frozen submodule, which is then
    checkpointed and resumed with the rest of the loss. Queues, centres and prototypes are buffers or
    parameters of the loss, so they are checkpointed too.
    A token-wise loss declares ``needs={"image-tokens", "text-tokens"}``; its batch holds
    ``image_tokens``/``image_mask`` and ``text_tokens``/``text_mask`` from the encoders' ``forward_tokens``.
    """


@hookspec
def register_samplers(register: Any) -> None:
    """Register samplers: ``register(name, component, needs=set())`` (``{"label"}`` for class-aware ones).

    Built with its options, a sampler has ``batches(n, labels, batch_size, seed, epoch)`` yielding the
    GLOBAL batches (lists of indices into the train split) of one epoch, deterministic from
    (seed, epoch); the engine shards each global batch across ranks (a batch shorter than ``batch_size``
    cannot be sharded evenly and is skipped). ``state_dict()`` and
    ``load_state_dict(state)`` carry whatever else it needs to resume.

    Optional: ``setup(split)`` is called once with the train split before the first epoch (to read its
    ``labels`` or ``captions``). A sampler with ``refresh_every`` (steps, > 0) gets
    ``refresh(embeddings)`` before the first epoch and then every ``refresh_every`` steps: the
    L2-normalised image embeddings of the whole train split under the current encoder (float32
    ``[N, D]`` on the CPU, the same on every rank). The engine then asks for the current epoch's batches
    again and continues at the same position, so ``state_dict`` must hold what ``refresh`` derived.
    """


@hookspec
def register_evaluators(register: Any) -> None:
    """Register evaluators: ``register(name, component, needs={"label", "text-tower"})``.

    Built with its options, an evaluator has ``evaluate(ctx) -> dict[str, float]``, where ``ctx`` is an
    ``orchestrator.engine.evaluation.EvalContext`` (encoders, dataset, device, batched encode helpers).
    Metric names are prefixed with the evaluator's name by the engine (``zs/top1``). An optional
    ``protocol() -> dict`` (k, temperature, templates, split...) is saved next to the results.
    """


# Lifecycle hooks run in rank 0 of the training processes, and ``run_ended`` also in the worker (for
# attempts whose processes died): an implementation finds its state for a run again by ``run.uid``.


@hookspec
def run_started(run: RunInfo, resumed_from: int | None) -> None:
    """A run (or a new attempt of it) starts training; ``resumed_from`` is the checkpoint step or None."""


@hookspec
def metrics_logged(run: RunInfo, step: int, metrics: dict[str, float]) -> None:
    """Metrics at ``step`` (training scalars or evaluation results). Called off the training hot path."""


@hookspec
def checkpoint_saved(run: RunInfo, step: int, path: Path) -> None:
    """A checkpoint at ``step`` is fully written to ``path`` and marked valid in the store."""


@hookspec
def run_ended(run: RunInfo, status: str, error: str | None) -> None:
    """An attempt ended: ``finished``, ``failed``, ``cancelled`` or ``interrupted`` (lease lost, or its worker
    stopped: the run resumes)."""
