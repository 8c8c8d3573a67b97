"""Gradient caching: a contrastive batch larger than memory allows, with the same loss and gradients.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (GradCache).
A contrastive loss couples every sample of its batch, so the batch cannot be cut into accumulation steps;
but the loss only reads the embeddings, which are small next to the activations that made them. So:

1. encode the micro-batch in chunks of ``chunk`` samples without a graph, keeping only the embeddings;
2. compute the loss once on all of them, held as leaf tensors, and its gradient with respect to them
   (and to the loss's own parameters: a learned temperature, a predictor head);
3. encode each chunk again, with a graph, under the RNG state of its first pass (dropout and drop-path
   draw the same masks), and backpropagate the cached gradient through it as the backward of the scalar
   ``sum(embedding * cached_gradient)``, whose gradient with respect to the embedding is the cached one.

Activation memory is that of one chunk instead of the whole micro-batch, for one more forward pass. The
step equals the uncached one for encoders without interaction between the samples of a batch (LayerNorm;
not BatchNorm, which normalises per chunk, as in the paper); running statistics are updated once per chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from orchestrator.engine.compose import RunModel, to_device
from orchestrator.errors import UserError

Encode = Callable[[dict[str, Any]], dict[str, Any]]
Backward = Callable[[torch.Tensor, bool], None]
Score = Callable[[dict[str, Any]], dict[str, torch.Tensor]]
Path = tuple[str, int | None]  # a feature key, and the index within it when the feature is a list (views)


def cached_step(model: RunModel, batch: dict[str, Any], chunk: int, encode: Encode | None = None,
                backward: Backward | None = None, score: Score | None = None,
                device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """One GradCache forward and backward of ``batch``; returns the loss dict (detached), as ``model(batch)``.

    ``encode(sub_batch)`` gives the features of a chunk (default ``model.encode``; the DeepSpeed engine's
    forward in ``engine_cached_step``), ``score(features)`` the loss dict (default ``model.score``),
    ``backward(scalar, last)`` backpropagates one surrogate scalar (default ``scalar.backward()``): one per
    chunk, ``last`` on the final one. ``device``: where the chunks are encoded; a batch held elsewhere (in host
    memory) moves there one chunk at a time, so only the features of the whole batch live on the device. To a
    GPU each chunk is pinned first, as it is copied: pinning the whole batch would hold it twice in host memory,
    in a block rounded up to a power of two (docs/scale.md).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, not {chunk}")
    encode = encode or model.encode
    score = score or model.score
    backward = backward or (lambda scalar, last: scalar.backward())
    pin = device is not None and device.type == "cuda"
    place = (lambda piece: piece) if device is None else (lambda piece: to_device(piece, device, pin))  # noqa: E731
    pieces = list(_split(batch, chunk))
    towers = list({id(m): m for m in (model.image_encoder, model.text_encoder) if m is not None}.values())

    statistics = _buffers(towers)
    saved = _snapshot(statistics)
    states, encoded, first = [], [], None
    with torch.no_grad():
        for piece in pieces:
            states.append(_rng_state())
            placed = place(piece)
            encoded.append(encode(placed))
            if first is None:
                first = placed
    _restore(statistics, saved)  # the graph pass below updates running statistics, once per chunk as usual

    paths = _embedding_paths(encoded[0], first)
    del first
    features, leaves = _join(encoded, paths)
    out = score(features)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out["loss"], leaves + params, allow_unused=True)
    leaf_grads = [torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]
    param_terms = [(p, g) for p, g in zip(params, grads[len(leaves):]) if g is not None]
    after_loss = _rng_state()

    offset = 0
    for i, piece in enumerate(pieces):
        _set_rng_state(states[i])
        again = encode(place(piece))
        embeddings = [_get(again, path) for path in paths]
        size = embeddings[0].shape[0] if embeddings else 0
        terms = [(e.to(g.dtype) * g[offset:offset + size]).sum() for e, g in zip(embeddings, leaf_grads)]
        last = i == len(pieces) - 1
        if last:  # the loss's own parameters: their gradient is already known, pass it on the same way
            terms += [(p * g.to(p.dtype)).sum() for p, g in param_terms]
        if terms:
            backward(torch.stack([t.float() for t in terms]).sum(), last)
        offset += size
    _set_rng_state(after_loss)
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


def engine_cached_step(engine: Any, batch: dict[str, Any], chunk: int) -> dict[str, torch.Tensor]:
    """``cached_step`` through a DeepSpeed engine: the chunk forwards go through ``engine(...)`` (its autocast
    and hooks) and every surrogate through ``engine.backward`` (accumulation scaling, loss scaling,
    reduction). Only the last backward of the micro-batch is a gradient-accumulation boundary, so ZeRO 0
    and 1 reduce the summed gradients once, at the boundary, as without caching; ZeRO 2 reduce-scatters
    after every backward (it partitions gradients as they are produced), once per chunk, and sums the
    partitions, which is the same sum. ZeRO 3 is refused: its parameters are partitioned outside forwards.
    The engine's boundary is left at this micro-batch's value for the ``engine.step()`` that follows. ``batch`` may
    be in host memory (train.py leaves it there, unpinned): each chunk is copied to the engine's device as it is
    encoded.
    """
    if engine.zero_optimization_partition_weights():
        raise UserError("--grad-cache works with --zero 0, 1 or 2, not 3: lower --zero or drop --grad-cache")
    model: RunModel = engine.module
    if chunk >= _batch_size(batch):  # one chunk: the plain step is the same, without the extra forward
        out = engine(to_device(batch, engine.device, engine.device.type == "cuda"))
        engine.backward(out["loss"])
        return out
    boundary = (engine.micro_steps + 1) % engine.gradient_accumulation_steps() == 0

    def backward(scalar: torch.Tensor, last: bool) -> None:
        engine.set_gradient_accumulation_boundary(boundary and last)
        engine.backward(scalar)

    def score(features: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss under the engine's autocast (``torch_autocast``), as inside ``engine(batch)``, but outside
        its forward: the engine's output hooks would take the gradient of the loss for a backward pass."""
        with _engine_autocast(engine):
            return model.score(features)

    return cached_step(model, batch, chunk, encode=lambda piece: engine(piece, part="encode"), backward=backward,
                       score=score, device=engine.device)


def _engine_autocast(engine: Any) -> AbstractContextManager[Any]:
    try:
        from deepspeed.runtime.torch_autocast import autocast_if_enabled
    except ImportError:  # a DeepSpeed without torch_autocast: its forward has no autocast either
        return nullcontext()
    return autocast_if_enabled(engine)


# --- batches and features ------------------------------------------------------------------------

def _split(batch: dict[str, Any], chunk: int) -> Iterator[dict[str, Any]]:
    """Sub-batches of ``chunk`` samples (dim 0 of every tensor; lists of views split view by view)."""
    size = _batch_size(batch)
    for start in range(0, size, chunk):
        yield {k: _slice(v, start, start + chunk) for k, v in batch.items()}


def _slice(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[start:stop]
    if isinstance(value, (list, tuple)):
        return type(value)(_slice(v, start, stop) for v in value)
    if isinstance(value, dict):
        return {k: _slice(v, start, stop) for k, v in value.items()}
    return value


def _batch_size(batch: dict[str, Any]) -> int:
    for value in batch.values():
        while isinstance(value, (list, tuple)) and value:
            value = value[0]
        if isinstance(value, dict) and value:
            return _batch_size(value)
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError("the batch holds no tensor")


def _tensor_ids(value: Any) -> set[int]:
    if isinstance(value, torch.Tensor):
        return {id(value)}
    if isinstance(value, (list, tuple)):
        return set().union(*(_tensor_ids(v) for v in value)) if value else set()
    if isinstance(value, dict):
        return _tensor_ids(list(value.values()))
    return set()


def _embedding_paths(features: dict[str, Any], piece: dict[str, Any]) -> list[Path]:
    """The features an encoder computed (floating tensors that are not inputs passed through, such as
    ``view_inputs``): the ones whose gradient is cached. Masks, labels and inputs are carried as they are."""
    inputs = _tensor_ids(piece)
    paths: list[Path] = []
    for key, value in features.items():
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for index, item in items:
            if isinstance(item, torch.Tensor) and item.is_floating_point() and id(item) not in inputs:
                paths.append((key, index))
    return paths


def _get(features: dict[str, Any], path: Path) -> torch.Tensor:
    key, index = path
    return features[key] if index is None else features[key][index]


def _join(encoded: list[dict[str, Any]], paths: list[Path]) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """The chunks' features as one batch; the embeddings become leaf tensors that collect the loss's
    gradient (fp16 ones are held in fp32, so the cached gradient cannot underflow before loss scaling)."""
    features: dict[str, Any] = {}
    for key, first in encoded[0].items():
        if isinstance(first, torch.Tensor):
            features[key] = torch.cat([e[key] for e in encoded])
        elif isinstance(first, (list, tuple)):
            features[key] = [torch.cat([e[key][i] for e in encoded]) for i in range(len(first))]
        else:
            features[key] = first
    leaves = []
    for key, index in paths:
        value = features[key] if index is None else features[key][index]
        leaf = value.float() if value.dtype == torch.float16 else value
        leaf = leaf.detach().requires_grad_()
        if index is None:
            features[key] = leaf
        else:
            features[key][index] = leaf
        leaves.append(leaf)
    return features, leaves


# --- state that the second pass must see as the first one did -----------------------------------

def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _buffers(modules: list[nn.Module]) -> list[torch.Tensor]:
    """Running statistics (BatchNorm and kin), which a forward in training mode updates."""
    norms = [m for module in modules for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    return [b for m in norms for b in m.buffers()]


def _snapshot(buffers: list[torch.Tensor]) -> list[torch.Tensor]:
    return [b.detach().clone() for b in buffers]


def _restore(buffers: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(buffers, saved):
            buffer.copy_(value)
