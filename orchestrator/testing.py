"""Test helpers for plugin authors: load a plugin without installing it, build and check its components
the way the engine does, and run the real ``orch`` command line.

    import orch_my_loss
    from orchestrator.testing import check, plugin_registry

    def test_my_loss():
        registry = plugin_registry(orch_my_loss)              # the registration module, no install needed
        check("loss", "my-loss", registry, temperature=0.1)   # built as `--loss my-loss:temperature=0.1`

``check(kind, name, registry, **options)`` builds the component through the registry (options go through
the same parsing, ``resolve`` and JSON round trip as ``orch queue``) and exercises the contract of its kind
(``check_dataset``, ``check_encoder``, ``check_loss``, ``check_sampler``, ``check_evaluator``,
``check_tracker``, each callable on its own; see docs/plugins.md); it returns the built component.
``check_loss_distributed`` checks that 2 gloo ranks x batch B equal 1 rank x batch 2B. ``eval_context()``
gives an evaluator tiny towers and data. ``assert_light(module)`` checks that loading a plugin and reading
its options imports no torch. ``run_orch(*args)`` runs the CLI in a subprocess. ``metrics_at_init(**flags)``
gives what a run's evaluators measure before its first step: the baseline a self-supervised bar is set on.

With ``pytest_plugins = ["orchestrator.testing"]`` in a top-level ``conftest.py``, the fixture
``orch_workdir`` (a scratch working directory with its own store, runs folder and MLflow store) is
available. This module imports no torch at module level (pytest only for the fixture, if installed).
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator, Sequence
from importlib.metadata import EntryPoint
from pathlib import Path
from types import ModuleType
from typing import Any

from orchestrator.registry import GROUP, KINDS, Registry

__all__ = ["PluginError", "assert_light", "build", "check", "check_dataset", "check_encoder", "check_evaluator",
           "check_loss", "check_loss_distributed", "check_sampler", "check_tracker", "eval_context", "installed",
           "plugin_registry", "resolve", "run_info", "run_orch"]

LIFECYCLE = ("run_started", "metrics_logged", "checkpoint_saved", "run_ended")
ENV_TO_CLEAR = ("ORCH_STORE", "ORCH_RUNS_DIR", "MLFLOW_TRACKING_URI", "ORCH_IMAGENET_ROOT", "ORCH_DISABLE_PLUGINS")


class PluginError(AssertionError):
    """A plugin under test is broken: it failed to import or its register hook raised."""


# --- registries -----------------------------------------------------------------------------------

def _distribution(name: str) -> importlib.metadata.Distribution | None:
    """The installed distribution ``name``; an ``*.egg-info`` folder in the current directory (a by-product
    of building the package from its source folder, perhaps stale) does not count as an installation."""
    cwd = Path.cwd().resolve()
    for dist in importlib.metadata.distributions(name=name):
        path = getattr(dist, "_path", None)
        if path is not None and Path(path).suffix == ".egg-info" and Path(path).resolve().parent == cwd:
            continue
        return dist
    return None


def installed(distribution: str) -> bool:
    """Whether ``distribution`` (e.g. ``"orch-my-loss"``) is installed, so its entry points are visible."""
    return _distribution(distribution) is not None


def plugin_registry(*modules: str | ModuleType, distribution: str | None = None, builtins: bool = False,
                    strict: bool = True) -> Registry:
    """A ``Registry`` holding the given plugin modules, loaded as if each were an ``orch`` entry point.

    ``modules`` are registration modules (objects or dotted names); each becomes an entry point named
    after its module. ``distribution`` adds the entry points of that installed distribution (what pip
    installed: this checks the pyproject). ``builtins=True`` adds every other installed entry point (orch's
    built-ins, to compose with them). With ``strict`` (the default) a broken plugin among ``modules`` or
    ``distribution`` raises ``PluginError`` with its error, instead of being listed as broken.
    """
    eps: list[EntryPoint] = []
    for module in modules:
        name = module if isinstance(module, str) else module.__name__
        importlib.import_module(name)  # an import error surfaces here with its whole traceback
        eps.append(EntryPoint(name=name, value=name, group=GROUP))
    ours = {ep.name for ep in eps}
    if distribution is not None:
        dist = _distribution(distribution)
        if dist is None:
            raise PluginError(f"{distribution} is not installed: pip install -e <its folder>")
        mine = [ep for ep in dist.entry_points if ep.group == GROUP]
        if not mine:
            raise PluginError(f"{distribution} declares no entry point in the {GROUP!r} group: add "
                              f'[project.entry-points.{GROUP}] NAME = "your_module" to its pyproject.toml')
        eps += mine
        ours |= {ep.name for ep in mine}
    if builtins:
        seen = {(ep.name, ep.value) for ep in eps}
        eps += sorted((ep for ep in importlib.metadata.entry_points(group=GROUP) if (ep.name, ep.value) not in seen),
                      key=lambda e: (e.dist.name if e.dist else "", e.name))
    registry = Registry.load(eps)
    broken = [b for b in registry.broken if b.name in ours]
    if strict and broken:
        raise PluginError("; ".join(f"plugin {b.name} is broken: {b.error}" for b in broken))
    return registry


def resolve(kind: str, name: str, registry: Registry | None = None, /, **options: Any) -> dict[str, Any]:
    """The resolved spec entry of a component, as ``orch queue`` stores it (every default filled in).

    Option values may be Python values or command-line strings: each is written as on the command line
    and parsed by its type hint, so an option orch cannot parse fails here as it would for a user.
    """
    from orchestrator.spec import resolve_component

    registry = registry if registry is not None else Registry.load()
    component = registry.get(kind, name)
    raw = {key: _to_cli(value) for key, value in options.items()}
    entry = resolve_component(component, raw, {"dataset": "data", "evaluator": "eval"}.get(kind, kind))
    return json.loads(json.dumps(entry))  # what the worker reads back from spec.json


def build(kind: str, name: str, registry: Registry | None = None, /, **options: Any) -> Any:
    """Build a component the way the engine does: resolve its options, then call it with them."""
    from orchestrator.engine.compose import build_component

    registry = registry if registry is not None else Registry.load()
    return build_component(registry, kind, resolve(kind, name, registry, **options))


def _to_cli(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_to_cli(v) for v in value) + "]"
    return str(value)


# --- contract checks ------------------------------------------------------------------------------

def check(kind: str, name: str, registry: Registry | None = None, /, **options: Any) -> Any:
    """Build ``name`` of ``kind`` with ``options`` and check the contract of its kind; return the component.

    ``kind`` is one of dataset, encoder, loss, sampler, evaluator, or ``tracker`` (then ``name`` is the
    entry point's name, and each lifecycle hook the plugin implements is called once with a fake run).
    For a component that needs other inputs than the defaults, call ``build`` and the ``check_<kind>``
    function yourself (``check_evaluator(evaluator, eval_context(dataset=...))``).
    """
    registry = registry if registry is not None else Registry.load()
    if kind == "tracker":
        return check_tracker(_tracker_module(registry, name))
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)} or tracker, not {kind!r}")
    declared = registry.get(kind, name).declared
    component = build(kind, name, registry, **options)
    if kind == "dataset":
        check_dataset(component, registry.get(kind, name).provides(resolve(kind, name, registry, **options)))
    elif kind == "encoder":
        check_encoder(component, declared.get("modality", "image"))
    elif kind == "loss":
        check_loss(component, declared.get("needs", ()))
    elif kind == "sampler":
        check_sampler(component, lambda: build(kind, name, registry, **options))
    else:
        check_evaluator(component, eval_context(text="text-tower" in declared.get("needs", ())))
    return component


def check_dataset(dataset: Any, provides: Collection[str]) -> None:
    """``train`` and ``test`` splits of dicts with the ``provides`` keys, the right types; labels, names."""
    import torch

    provides = set(provides)
    assert provides and provides <= {"image", "text", "label"}, "declare provides= a subset of image, text, label"
    for split_name in ("train", "test"):
        split = getattr(dataset, split_name, None)
        assert split is not None and len(split) > 0, f"the dataset needs a non-empty {split_name} split"
        for i in sorted({0, len(split) - 1}):
            item = split[i]
            assert provides <= set(item), f"{split_name}[{i}] lacks {provides - set(item)}"
            if "image" in provides:
                image = item["image"]
                assert isinstance(image, torch.Tensor) and image.ndim == 3 and image.is_floating_point(), \
                    f"{split_name}[{i}]['image'] must be a float C x H x W tensor"
                assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0, "images must be in [0, 1]"
            if "text" in provides:
                assert isinstance(item["text"], str), f"{split_name}[{i}]['text'] must be a str"
            if "label" in provides:
                assert isinstance(item["label"], int), f"{split_name}[{i}]['label'] must be an int"
        if "label" in provides:
            labels = split.labels
            assert len(labels) == len(split), f"{split_name}.labels must hold one int per sample"
            assert all(0 <= y < len(dataset.class_names) for y in labels), "labels must index into class_names"
    if "label" in provides:
        assert dataset.class_names and all(isinstance(n, str) for n in dataset.class_names), "class_names: strs"
        assert dataset.templates and all("{}" in t for t in dataset.templates), "templates must hold '{}'"


def check_encoder(encoder: Any, modality: str = "image", image_shape: Sequence[int] = (1, 28, 28)) -> None:
    """An ``nn.Module`` with an int ``embed_dim``; ``transform`` (applied to a random ``image_shape`` image,
    the shape of the default dataset's images) and/or ``tokenize``; ``forward`` gives ``[B, embed_dim]``
    and gradients reach its parameters."""
    import torch
    from torch import nn

    assert isinstance(encoder, nn.Module), "an encoder is an nn.Module"
    assert isinstance(getattr(encoder, "embed_dim", None), int), "an encoder has an int embed_dim attribute"
    outputs = []
    if modality in ("image", "both"):
        assert callable(getattr(encoder, "transform", None)), "an image encoder has a transform"
        batch = torch.stack([encoder.transform(torch.rand(*image_shape)) for _ in range(3)])
        outputs.append(encoder(batch, **({"modality": "image"} if modality == "both" else {})))
    if modality in ("text", "both"):
        tokens = encoder.tokenize(["a photo of a cat.", "a drawing.", ""])
        assert isinstance(tokens, torch.Tensor) and tokens.dtype == torch.long, "tokenize returns a LongTensor"
        outputs.append(encoder(tokens, **({"modality": "text"} if modality == "both" else {})))
    for out in outputs:
        assert out.shape == (3, encoder.embed_dim), f"forward returns [B, embed_dim], got {tuple(out.shape)}"
        assert torch.isfinite(out).all(), "non-finite embeddings"
    sum(o.float().sum() for o in outputs).backward()
    assert any(p.grad is not None for p in encoder.parameters()), "no parameter receives a gradient"


def _loss_batch(needs: set[str], n: int, dim: int, seed: int, classes: int = 3) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    batch: dict[str, Any] = {key: torch.randn(n, dim, generator=g) for key in ("image", "text") if key in needs}
    if "label" in needs:
        batch["label"] = torch.arange(n) % classes
    return batch


def _view_tower(loss: Any, dim: int, seed: int) -> Any:
    """A tiny image tower (1 x 4 x 4 -> ``dim``) for a views loss, seeded, bound to the loss as the engine does."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    tower = nn.Sequential(nn.Flatten(), nn.Linear(16, dim))
    if hasattr(loss, "bind"):
        loss.bind(tower)
    return tower


def _view_inputs(loss: Any, n: int, seed: int) -> list[Any]:
    import torch

    assert getattr(loss, "views", None), "a loss that needs views has a non-empty list `views` of augmentations"
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 4, 4, generator=g) for _ in loss.views]


def _embed_views(batch: dict[str, Any], tower: Any, inputs: list[Any]) -> list[Any]:
    """Fill ``views`` and ``view_inputs`` as the engine does; returns the view embeddings (grads retained)."""
    views = [tower(x) for x in inputs]
    for v in views:
        v.retain_grad()
    batch["views"], batch["view_inputs"] = views, inputs
    return views


def check_loss(loss: Any, needs: Collection[str], n: int = 8, dim: int = 16) -> None:
    """An ``nn.Module`` whose ``forward`` on random embeddings of what it ``needs`` returns a dict of finite
    scalar tensors with ``loss``, through which gradients reach the embeddings; ``after_step()`` runs."""
    import torch
    from torch import nn

    needs = set(needs)
    assert isinstance(loss, nn.Module), "a loss is an nn.Module"
    assert needs & {"image", "text", "views"}, "declare needs= with image, text or views (and label if it uses labels)"
    batch = _loss_batch(needs, n, dim, seed=0)
    for key in ("image", "text"):
        if key in batch:
            batch[key].requires_grad_(True)
    views = _embed_views(batch, _view_tower(loss, dim, seed=0), _view_inputs(loss, n, seed=0)) \
        if "views" in needs else []
    out = loss(batch)
    assert isinstance(out, dict) and "loss" in out, "forward returns a dict with 'loss'"
    for key, value in out.items():
        assert isinstance(value, torch.Tensor) and value.numel() == 1, f"out[{key!r}] must be a scalar tensor"
        assert torch.isfinite(value).all(), f"out[{key!r}] is not finite"
    out["loss"].backward()
    for key in ("image", "text"):
        if key in batch:
            assert batch[key].grad is not None, f"the loss does not depend on the {key} embeddings"
    if views:
        assert any(v.grad is not None for v in views), "the loss does not depend on the view embeddings"
    if hasattr(loss, "after_step"):
        loss.after_step()


def check_sampler(sampler: Any, fresh: Callable[[], Any] | None = None, n: int = 37, batch_size: int = 8) -> None:
    """``batches(n, labels, batch_size, seed, epoch)`` is deterministic from (seed, epoch), gives int indices
    in ``range(n)``, full batches (a short one only last); a ``fresh()`` sampler given the state resumes."""
    labels = [i % 3 for i in range(n)]

    def epoch(s: Any, e: int) -> list[list[int]]:
        return [list(b) for b in s.batches(n, labels, batch_size, 0, e)]

    first = epoch(sampler, 0)
    assert first, f"no batches for {n} samples in batches of {batch_size}"
    assert first == epoch(sampler, 0), "batches() must be deterministic from (seed, epoch)"
    for i, b in enumerate(first):
        assert b and all(isinstance(j, int) and 0 <= j < n for j in b), "indices must be ints in range(n)"
        assert len(b) == batch_size or (i == len(first) - 1 and len(b) < batch_size), \
            f"batch {i} holds {len(b)} indices: every global batch but the last holds batch_size={batch_size}"
    state = copy.deepcopy(sampler.state_dict())
    if fresh is not None:
        other = fresh()
        other.load_state_dict(state)
        assert epoch(other, 1) == epoch(sampler, 1), "a sampler given state_dict() must give the same batches"


def check_evaluator(evaluator: Any, ctx: Any) -> dict[str, float]:
    """``evaluate(ctx)`` returns a non-empty dict of finite numbers named without the evaluator's prefix."""
    results = evaluator.evaluate(ctx)
    assert isinstance(results, dict) and results, "evaluate(ctx) returns a non-empty dict of named metrics"
    for key, value in results.items():
        assert isinstance(key, str) and "/" not in key, f"metric {key!r}: the engine adds the evaluator's prefix"
        assert math.isfinite(float(value)), f"metric {key!r} = {value} is not a finite number"
    return results


def _tracker_module(registry: Registry, name: str) -> ModuleType:
    tracker = next((t for t in registry.trackers if t.name == name), None)
    if tracker is None:
        names = ", ".join(t.name for t in registry.trackers) or "none"
        raise PluginError(f"no tracker {name!r} (trackers: {names}): implement a lifecycle hook in the module "
                          f"named by the entry point")
    return tracker.target


def check_tracker(module: ModuleType, run_dir: Path | None = None) -> ModuleType:
    """Call each lifecycle hook ``module`` implements once, in order, with a fake run (in ``run_dir``)."""
    with tempfile.TemporaryDirectory() as tmp:
        run = run_info(Path(run_dir or tmp))
        arguments = {"run_started": {"resumed_from": None},
                     "metrics_logged": {"step": 1, "metrics": {"train/loss": 1.0}},
                     "checkpoint_saved": {"step": 1, "path": run.run_dir / "checkpoints" / "step-00000001"},
                     "run_ended": {"status": "finished", "error": None}}
        for hook in LIFECYCLE:
            impl = getattr(module, hook, None)
            if impl is not None:
                given = {"run": run, **arguments[hook]}
                impl(**{k: given[k] for k in inspect.signature(impl).parameters})
    return module


def run_info(run_dir: Path, spec: dict[str, Any] | None = None, **fields: Any):  # noqa: ANN201 - RunInfo
    """A ``RunInfo`` for calling lifecycle hooks in a test (run 1, attempt 1, in ``run_dir``)."""
    from orchestrator.runinfo import RunInfo

    values = {"id": 1, "uid": "0123456789abcdef", "name": "test-run", "spec": spec or {}, "spec_hash": "0" * 64,
              "attempt": 1, "run_dir": Path(run_dir), **fields}
    return RunInfo(**values)


def image_folder(root: Path, classes: Sequence[str], per_class: int = 3) -> Path:
    """An image folder in ImageFolder layout (one sub-folder per class, as ImageNet's validation folder): each
    class ``per_class`` random 40 x 48 RGB JPEGs, the same for the same arguments. Returns ``root``."""
    import torch
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(40, 48, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"ILSVRC2012_val_{i}.JPEG")
    return root


def eval_context(dataset: Any = None, text: bool = True, image_encoder: Any = None, text_encoder: Any = None):  # noqa: ANN201
    """An ``EvalContext`` on CPU with tiny random towers and (by default) a small labelled dataset."""
    import torch

    from orchestrator.engine.evaluation import EvalContext

    tiny = _tiny()
    torch.manual_seed(0)
    image_encoder = image_encoder if image_encoder is not None else tiny.ImageTower()
    if text and text_encoder is None:
        text_encoder = tiny.TextTower()
    return EvalContext(image_encoder, text_encoder if text else None, dataset if dataset is not None else
                       tiny.dataset(), torch.device("cpu"))


def _tiny():  # noqa: ANN202 - a namespace of small torch classes, made on first use (torch stays unimported)
    import types

    import torch
    import torch.nn.functional as F
    from torch import nn

    from orchestrator.data import labelled_splits

    class ImageTower(nn.Module):
        """Any image -> 1 x 8 x 8 -> linear -> 16 dims."""

        embed_dim = 16

        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(64, self.embed_dim)

        @staticmethod
        def transform(image: torch.Tensor) -> torch.Tensor:
            return F.interpolate(image.mean(0, keepdim=True)[None], size=(8, 8), mode="bilinear")[0]

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.linear(images.flatten(1))

    class TextTower(nn.Module):
        """A bag of UTF-8 bytes -> 16 dims."""

        embed_dim = 16

        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.EmbeddingBag(257, self.embed_dim, padding_idx=256)

        @staticmethod
        def tokenize(texts: list[str]) -> torch.Tensor:
            rows = [list(t.encode()[:32]) for t in texts]
            return torch.tensor([r + [256] * (32 - len(r)) for r in rows], dtype=torch.long)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.embedding(tokens)

    def dataset(classes: int = 3, per_class: int = 10) -> Any:
        g = torch.Generator().manual_seed(0)
        labels = [i % classes for i in range(classes * per_class)]
        images = (torch.rand(len(labels), 1, 8, 8, generator=g) * 0.5
                  + torch.tensor(labels, dtype=torch.float32).view(-1, 1, 1, 1) / (2 * classes))
        names, templates = [f"class {k}" for k in range(classes)], ["a photo of {}.", "a picture of {}."]
        data = types.SimpleNamespace(class_names=names, templates=templates)
        data.train, data.test = labelled_splits(images, labels, names, templates, 0.3)
        return data

    return types.SimpleNamespace(ImageTower=ImageTower, TextTower=TextTower, dataset=dataset)


# --- distributed equivalence of a loss ------------------------------------------------------------

def check_loss_distributed(name: str, *modules: str, world_size: int = 2, n: int = 8, dim: int = 16,
                           atol: float = 1e-5, **options: Any) -> None:
    """Check that ``world_size`` gloo ranks x batch ``n`` equal 1 rank x batch ``world_size * n``.

    The loss ``name`` is built (seeded alike) in each rank from a registry of ``modules`` (dotted names of
    registration modules; none: the installed entry points) with ``options``. Compared with one process
    on the whole batch: the mean over ranks of the loss, the gradient of each rank's embeddings (the
    all-gather's backward sums over ranks, so divided by ``world_size``) and the parameter gradients
    averaged over ranks (as DeepSpeed averages them). A loss that needs views gets a tiny image tower
    (bound with ``bind`` when the loss has it), and that tower's gradients are compared too. Takes a few
    seconds: it spawns the ranks.
    """
    import torch
    import torch.multiprocessing as mp

    reference = _loss_grads(name, modules, options, n * world_size, dim, None)
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_loss_rank, args=(world_size, tmp, name, modules, options, n, dim), nprocs=world_size,
                           start_method="spawn")
        ranks = [torch.load(Path(tmp) / f"rank{r}.pt") for r in range(world_size)]
    loss = sum(r["loss"] for r in ranks) / world_size
    assert abs(loss - reference["loss"]) <= atol * max(1.0, abs(reference["loss"])), \
        f"loss over {world_size} ranks {loss} != one rank on the whole batch {reference['loss']}: gather with " \
        f"orchestrator.distributed.gather_with_grad"
    for key in reference["inputs"]:
        got = torch.cat([r["inputs"][key] for r in ranks]) / world_size
        assert torch.allclose(got, reference["inputs"][key], atol=atol), f"gradients of the {key} embeddings differ"
    for key, grad in reference["params"].items():
        got = sum(r["params"][key] for r in ranks) / world_size
        assert torch.allclose(got, grad, atol=atol), f"gradient of parameter {key} differs"


def _loss_grads(name: str, modules: Sequence[str], options: dict[str, Any], n: int, dim: int,
                shard: tuple[int, int] | None) -> dict[str, Any]:
    """Loss, and gradients of its inputs and parameters, on the whole batch or on this rank's shard of it.
    A views loss gets a tiny bound image tower (its parameters' gradients are compared too)."""
    import torch

    registry = plugin_registry(*modules) if modules else Registry.load()
    needs = set(registry.get("loss", name).declared.get("needs", ()))
    torch.manual_seed(0)
    loss = build("loss", name, registry, **options)
    batch = _loss_batch(needs, n, dim, seed=1)
    tower = _view_tower(loss, dim, seed=2) if "views" in needs else None
    inputs = _view_inputs(loss, n, seed=3) if tower is not None else []
    start, stop = 0, n
    if shard is not None:
        rank, world = shard
        start, stop = rank * (n // world), (rank + 1) * (n // world)
        batch = {k: v[start:stop] for k, v in batch.items()}
        inputs = [x[start:stop] for x in inputs]
    for key in ("image", "text"):
        if key in batch:
            batch[key].requires_grad_(True)
    views = _embed_views(batch, tower, inputs) if tower is not None else []
    out = loss(batch)
    out["loss"].backward()
    grads = {k: batch[k].grad.detach().clone() for k in ("image", "text") if k in batch}
    grads.update({f"view {i}": v.grad.detach().clone() if v.grad is not None else torch.zeros_like(v)
                  for i, v in enumerate(views)})
    params = dict(loss.named_parameters())
    if tower is not None:
        params.update({f"tower.{k}": p for k, p in tower.named_parameters()})
    return {"loss": float(out["loss"].detach()), "inputs": grads,
            "params": {k: p.grad.detach().clone() for k, p in params.items() if p.grad is not None}}


def _loss_rank(rank: int, world: int, tmp: str, name: str, modules: Sequence[str], options: dict[str, Any],
               n: int, dim: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    result = _loss_grads(name, modules, options, n * world, dim, (rank, world))
    torch.save(result, Path(tmp) / f"rank{rank}.pt")
    leave_rank()


def leave_rank() -> None:
    """End a spawned test rank whose results are saved: wait for every rank, destroy the group, and exit
    without interpreter teardown. Gloo's threads can abort a process while Python finalizes ("terminate called
    without an active exception", seen in this suite; pytorch/pytorch#179291), which fails a test that passed."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- the command line -----------------------------------------------------------------------------

def metrics_at_init(*, seed: int = 0, **choices: str | list[str]) -> dict[str, float]:
    """What a run's evaluators measure before its first step, on the CPU: the baseline a self-supervised
    method must beat. ``choices`` are the run's flags (``encoder="vit", loss="ntxent", eval=["knn"]``); the
    encoders are built exactly as the run builds them (same spec, same ``seed``)."""
    import torch

    from orchestrator.engine.compose import build as compose
    from orchestrator.engine.evaluation import EvalContext
    from orchestrator.spec import resolve_run

    registry = Registry.load()
    if isinstance(choices.get("eval"), str):
        choices["eval"] = [choices["eval"]]
    comp = compose(registry, resolve_run(registry, choices, {"seed": str(seed)}))
    model = comp.model.eval()
    ctx = EvalContext(model.image_encoder, model.text_tower, comp.dataset, torch.device("cpu"))
    with torch.no_grad():
        return {f"{name}/{key}": value for name, evaluator in comp.evaluators
                for key, value in evaluator.evaluate(ctx).items()}


def run_orch(*args: str, cwd: str | Path | None = None, env: dict[str, str] | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real ``orch`` command line in a subprocess (this interpreter, the current environment
    updated with ``env``); returns the completed process with text ``stdout`` and ``stderr``."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def assert_light(*modules: str) -> None:
    """Loading these registration modules and reading their components' options imports no torch.

    ``orch plugins`` and ``orch queue`` must stay fast: register ``"module:Class"`` strings, keep heavy
    imports out of the registration module, and give options type hints orch can read from the source
    (int, float, bool, str, Literal, Path, tuple, list, Optional) with literal defaults.
    """
    code = (f"import json, sys\nfrom orchestrator.testing import plugin_registry\nplugin_registry(*{list(modules)!r})\n"
            "print(json.dumps([m for m in ('torch', 'deepspeed', 'mlflow') if m in sys.modules]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    heavy = json.loads(result.stdout.strip().splitlines()[-1])
    assert not heavy, f"loading {', '.join(modules)} and reading its options imported {', '.join(heavy)}"


# --- pytest fixtures (pytest_plugins = ["orchestrator.testing"]) ----------------------------------

try:
    import pytest
except ImportError:  # pytest is only needed for the fixtures
    pytest = None

if pytest is not None:
    @pytest.fixture
    def orch_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
        """A fresh working directory (the current one during the test) with its own default store, runs
        folder and MLflow store; orch's environment variables are cleared."""
        monkeypatch.chdir(tmp_path)
        for var in ENV_TO_CLEAR:
            monkeypatch.delenv(var, raising=False)
        yield tmp_path
