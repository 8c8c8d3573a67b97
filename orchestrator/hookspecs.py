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

    Built with its options, a dataset has ``train`` and ``test`` splits (fixed, held out), each a
    sequence whose items are dicts with the provided keys: ``image`` a float tensor C x H x W in [0, 1],
    ``text`` a caption ``str``, ``label`` an ``int``. A split with labels has ``labels`` (a list of ints).
    A labelled dataset has ``class_names`` and ``templates`` (prompt format strings with ``{}``).
    """


@hookspec
def register_encoders(register: Any) -> None:
    """Register encoders: ``register(name, component, modality="image" | "text" | "both")``.

    Built with its options, an encoder is an ``nn.Module`` whose ``forward`` returns embeddings
    ``[B, embed_dim]`` (not normalised; ``embed_dim`` is an option and an attribute). An image encoder
    has ``transform`` (applied to each image tensor; picklable, for data-loading workers); a text encoder
    has ``tokenize(list[str]) -> LongTensor``.
    An encoder of modality ``both`` has both and takes ``forward(x, modality=...)``.
    """


@hookspec
def register_losses(register: Any) -> None:
    """Register losses: ``register(name, component, needs={"image", "text"})`` (or ``{"image", "label"}``...).

    Built with its options, a loss is an ``nn.Module`` (it may own parameters) whose
    ``forward(batch)`` takes a dict of embeddings (``image``, ``text``) and of ``label`` as needed, and
    returns a dict with ``loss`` and other scalar tensors worth logging (each is averaged and logged).
    With several ranks it gathers what it must with gradients (``orchestrator.distributed.gather_with_grad``),
    so that 2 ranks x batch B equal 1 rank x batch 2B. An optional ``after_step()`` runs after each
    optimizer step (clamps, EMA updates).
    """


@hookspec
def register_samplers(register: Any) -> None:
    """Register samplers: ``register(name, component, needs=set())`` (``{"label"}`` for class-aware ones).

    Built with its options, a sampler has ``batches(n, labels, batch_size, seed, epoch)`` yielding the
    GLOBAL batches (lists of indices into the train split) of one epoch, deterministic from
    (seed, epoch); the engine shards each global batch across ranks (a batch shorter than ``batch_size``
    cannot be sharded evenly and is skipped). ``state_dict()`` and
    ``load_state_dict(state)`` carry whatever else it needs to resume.
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
    """An attempt ended: ``finished``, ``failed``, ``cancelled`` or ``interrupted`` (lease lost, will resume)."""
