"""``orch plugins new NAME --kind KIND``: write a plugin package that installs and passes its own tests.

The package ``orch-NAME/`` holds a pyproject with the ``orch`` entry point, a torch-free registration
module ``orch_NAME/__init__.py``, an implementation module with a minimal correct component of KIND whose
docstring says what to fill in, tests on ``orchestrator.testing`` and a README. The templates are the
string constants below; ``@NAME@``, ``@MODULE@``, ``@DIST@``, ``@CLASS@`` and ``@KIND@`` are replaced.
Imports nothing heavy: this runs in the CLI.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from orchestrator.errors import UserError

KINDS = ("loss", "encoder", "dataset", "sampler", "evaluator", "tracker")
NAME_RE = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
MAX_NAME = 48

PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "@DIST@"
version = "0.1.0"
description = "An orch plugin: the @KIND@ @NAME@"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["orch"]

[project.optional-dependencies]
test = ["pytest>=8"]

# orch finds plugins through this entry point group; the value is the registration module.
[project.entry-points.orch]
@NAME@ = "@MODULE@"

[tool.setuptools]
packages = ["@MODULE@"]

[tool.pytest.ini_options]
testpaths = ["tests"]
filterwarnings = ["ignore::DeprecationWarning", "ignore::FutureWarning"]
'''

REGISTRATION_HEAD = '''\
"""@DIST@: registers the @KIND@ `@NAME@` with orch.

The ``orch`` entry point names this module, and ``orch plugins`` / ``orch queue`` import it: keep it
light (no torch). It registers a ``"module:Class"`` string, so orch reads the options (the keyword
parameters of ``__init__``, with type hints and literal defaults) from the source without importing it.
"""
'''

TRACKER_HEAD = '''\
"""@DIST@: the tracker `@NAME@` for orch.

The ``orch`` entry point names this module, and ``orch plugins`` imports it: keep it light (no torch).
A tracker is the run lifecycle hooks of this module: they are implemented in ``tracker.py`` and
imported here.
"""
'''

REGISTRATIONS = {
    "loss": ("losses", 'register("@NAME@", "@MODULE@.loss:@CLASS@", needs={"image", "text"})',
             "``needs``: what forward() gets: image and/or text embeddings, and label"),
    "encoder": ("encoders", 'register("@NAME@", "@MODULE@.encoder:@CLASS@", modality="image")',
                '``modality``: "image", "text" (a --text-encoder) or "both" (one tower shared by both)'),
    "dataset": ("datasets", 'register("@NAME@", "@MODULE@.dataset:@CLASS@", provides={"image", "text", "label"})',
                "``provides``: the keys of each sample; losses, samplers and evaluators are checked against it"),
    "sampler": ("samplers", 'register("@NAME@", "@MODULE@.sampler:@CLASS@", needs=set())',
                '``needs``: {"label"} for a sampler that uses the labels (then only labelled datasets)'),
    "evaluator": ("evaluators", 'register("@NAME@", "@MODULE@.evaluator:@CLASS@", needs={"label"})',
                  '``needs``: dataset keys, and "text-tower" for an evaluator that encodes text'),
}

REGISTRATION_HOOK = '''
from orchestrator import hookimpl


@hookimpl
def register_@PLURAL@(register):
    # @HELP@
    @CALL@
'''

TRACKER_REGISTRATION = '''
from @MODULE@.tracker import checkpoint_saved, metrics_logged, run_ended, run_started

__all__ = ["checkpoint_saved", "metrics_logged", "run_ended", "run_started"]
'''

IMPLEMENTATIONS = {
    "loss": '''\
"""The loss `@NAME@`: replace the InfoNCE below with your objective.

orch calls ``forward(batch)`` with the embeddings the loss ``needs`` (see ``__init__.py``): ``image``
and ``text``, each ``[B, D]`` on this rank, not normalised (and ``label`` ``[B]`` if declared). It
returns a dict with ``loss`` and any other SCALAR tensors worth logging. With several ranks, gather what
each sample is compared against with ``gather_with_grad``, so that 2 ranks x batch B equal 1 rank x
batch 2B (the tests check it). The module may own parameters (a learnable temperature, a predictor
head): orch trains them with the towers. An optional ``after_step()`` runs after each optimizer step.
Options are the keyword parameters of ``__init__``: ``orch run --loss @NAME@:temperature=0.05``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from orchestrator.distributed import gather_with_grad, rank
from torch import nn


class @CLASS@(nn.Module):
    """Symmetric image-text InfoNCE with a fixed temperature (the starting point of @NAME@)."""

    def __init__(self, temperature: float = 0.07) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, not {temperature}")
        self.temperature = temperature

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = F.normalize(batch["image"].float(), dim=-1)
        text = F.normalize(batch["text"].float(), dim=-1)
        logits_per_image = image @ gather_with_grad(text).T / self.temperature
        logits_per_text = text @ gather_with_grad(image).T / self.temperature
        targets = torch.arange(len(image), device=image.device) + len(image) * rank()
        loss = (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_text, targets)) / 2
        accuracy = (logits_per_image.argmax(dim=-1) == targets).float().mean()
        return {"loss": loss, "accuracy": accuracy}
''',
    "encoder": '''\
"""The encoder `@NAME@`: replace the MLP below with your image tower.

An encoder is an ``nn.Module`` whose ``forward(images)`` returns ``[B, embed_dim]`` embeddings (not
normalised), with an int attribute ``embed_dim`` and a ``transform`` that orch applies to each image
(a float C x H x W tensor in [0, 1], of whatever size the dataset has) before batching: resizing and
normalisation live here. Keep ``transform`` picklable (a class, not a lambda): data-loading workers
may need it. The default ``embed_dim`` matches orch's default text tower. A text tower declares
``modality="text"`` and has ``tokenize(list[str]) -> LongTensor`` instead of ``transform``.
Options are the keyword parameters of ``__init__``: ``orch run --encoder @NAME@:hidden=512``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Preprocess:
    """Any C x H x W image in [0, 1] -> ``channels`` x ``size`` x ``size`` in [-1, 1]."""

    def __init__(self, size: int, channels: int) -> None:
        self.size, self.channels = size, channels

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[0] != self.channels:
            image = image.mean(0, keepdim=True).expand(self.channels, -1, -1)
        image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", antialias=True)[0]
        return image * 2 - 1


class @CLASS@(nn.Module):
    """A small MLP image encoder (the starting point of @NAME@)."""

    def __init__(self, image_size: int = 28, channels: int = 1, hidden: int = 256, embed_dim: int = 128) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.transform = Preprocess(image_size, channels)
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(channels * image_size**2, hidden), nn.GELU(),
                                    nn.Linear(hidden, embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)
''',
    "dataset": '''\
"""The dataset `@NAME@`: replace the synthetic images below with your data.

Built with its options, a dataset has ``train`` and ``test`` splits (the test split fixed and held out,
whatever the seed), each a sequence of dicts with the keys it ``provides``: ``image`` a float tensor
C x H x W in [0, 1], ``text`` a caption, ``label`` an int; a labelled split has ``labels``. A labelled
dataset has ``class_names`` and ``templates`` (prompts with ``{}``, used by zero-shot evaluation).
``orchestrator.data`` has helpers: ``LabelledSplit``, ``labelled_splits`` (captions from the templates
and a stratified held-out split). orch downloads nothing at run time: read local files (take a
``root: Path`` option) or data shipped with a package. Options are the keyword parameters of
``__init__``: ``orch run --data @NAME@:per_class=100``.
"""

from __future__ import annotations

import torch
from orchestrator.data import labelled_splits


class @CLASS@:
    """Synthetic labelled images: a random pattern per class plus noise (the starting point of @NAME@)."""

    def __init__(self, classes: int = 4, per_class: int = 64, image_size: int = 28, seed: int = 0,
                 test_fraction: float = 0.2) -> None:
        if classes < 2 or per_class < 2:
            raise ValueError("want at least 2 classes of at least 2 images")
        generator = torch.Generator().manual_seed(seed)
        self.class_names = [f"pattern {k}" for k in range(classes)]
        self.templates = ["a picture of {}.", "an image of {}."]
        labels = [i % classes for i in range(classes * per_class)]
        patterns = torch.rand(classes, 1, image_size, image_size, generator=generator)
        noise = torch.rand(len(labels), 1, image_size, image_size, generator=generator)
        images = 0.7 * patterns[labels] + 0.3 * noise
        self.train, self.test = labelled_splits(images, labels, self.class_names, self.templates, test_fraction)
''',
    "sampler": '''\
"""The sampler `@NAME@`: replace the shuffling below with your batch construction.

``batches(n, labels, batch_size, seed, epoch)`` returns the GLOBAL batches (lists of indices into the
train split, ``labels`` its labels or None) of one epoch; orch cuts each into per-rank shards. It must
be deterministic from (seed, epoch): a resumed run replays the epoch it was in. Every batch but the last
holds ``batch_size`` indices. ``state_dict()`` / ``load_state_dict()`` carry anything else it needs to
resume (a hard-negative memory, a curriculum). Hard negatives, class balance and curation live here.
Options are the keyword parameters of ``__init__``: ``orch run --sampler @NAME@:drop_last=false``.
"""

from __future__ import annotations

from typing import Any

import torch


class @CLASS@:
    """Uniformly shuffled batches, a new permutation each epoch (the starting point of @NAME@)."""

    def __init__(self, drop_last: bool = True) -> None:
        self.drop_last = drop_last

    def batches(self, n: int, labels: list[int] | None, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**63)
        order = torch.randperm(n, generator=generator).tolist()
        stop = n - n % batch_size if self.drop_last else n
        return [order[i:i + batch_size] for i in range(0, stop, batch_size)]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
''',
    "evaluator": '''\
"""The evaluator `@NAME@`: replace the nearest-neighbour accuracy below with your metric.

``evaluate(ctx)`` gets an ``orchestrator.engine.evaluation.EvalContext``: the trained towers
(``ctx.image_encoder``, ``ctx.text_encoder`` or None), the run's ``ctx.dataset`` and batched helpers
that return L2-normalised float32 embeddings: ``encode_images(images)``, ``encode_texts(texts)`` (declare
``needs={"text-tower"}``) and ``encode_split(split) -> (features, labels)``. It returns named numbers;
orch prefixes them with the evaluator's name (``@NAME@/top1``). An optional ``protocol()`` returns a
dict describing how the numbers were obtained (stored in the run's eval report).
Options are the keyword parameters of ``__init__``: ``orch run --eval @NAME@:max_train=1000``.
"""

from __future__ import annotations

import torch
from orchestrator.engine.evaluation import EvalContext, SplitImages


class @CLASS@:
    """1-nearest-neighbour top-1 accuracy (%) of the held-out split among train features (start of @NAME@)."""

    def __init__(self, max_train: int = 5000) -> None:
        self.max_train = max_train

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        train, test = ctx.dataset.train, ctx.dataset.test
        keep = min(len(train), self.max_train)
        train_features = ctx.encode_images(SplitImages(train)[:keep]).cpu()
        train_labels = torch.as_tensor(train.labels[:keep])
        features, labels = ctx.encode_split(test)
        nearest = (features.cpu() @ train_features.T).argmax(dim=-1)
        return {"top1": 100.0 * (train_labels[nearest] == labels).float().mean().item()}
''',
    "tracker": '''\
"""The tracker `@NAME@`: replace the JSON lines below with calls to your tracking service.

A tracker implements some of the run lifecycle hooks (``orchestrator.hookspecs``): ``run_started``,
``metrics_logged``, ``checkpoint_saved`` and ``run_ended``. They run in the worker and in rank 0 of the
training processes, sometimes for the same run: find your run again by ``run.uid``, not by state kept
in memory. A hook that raises only warns (the run goes on), but it runs on the training path: keep it
fast and move slow I/O to a thread. Keep this module torch-free: ``orch plugins`` imports it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from orchestrator import hookimpl

FILENAME = "@NAME@.jsonl"  # in the run's folder (runs/<id>/ by default)


def _write(run: Any, event: str, **fields: Any) -> None:
    record = {"event": event, "run": run.id, "uid": run.uid, "attempt": run.attempt, "time": time.time(), **fields}
    with open(Path(run.run_dir) / FILENAME, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\\n")


@hookimpl
def run_started(run: Any, resumed_from: int | None) -> None:
    _write(run, "run_started", resumed_from=resumed_from)


@hookimpl
def metrics_logged(run: Any, step: int, metrics: dict[str, float]) -> None:
    _write(run, "metrics_logged", step=step, metrics=metrics)


@hookimpl
def checkpoint_saved(run: Any, step: int, path: Path) -> None:
    _write(run, "checkpoint_saved", step=step, path=str(path))


@hookimpl
def run_ended(run: Any, status: str, error: str | None) -> None:
    _write(run, "run_ended", status=status, error=error)
''',
}

CONFTEST = '''\
pytest_plugins = ["orchestrator.testing"]  # orch's helpers for plugin authors: the orch_workdir fixture
'''

TESTS_HEAD = '''\
"""Tests of @DIST@, on orch's helpers for plugin authors (``orchestrator.testing``).

Run: ``pip install -e . && python -m pytest``. The tests marked ``needs_install`` check what orch finds
through the installed entry point; the others load the registration module directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from orchestrator.testing import @HELPERS@

import @MODULE@

needs_install = pytest.mark.skipif(not installed("@DIST@"), reason="not installed: pip install -e . first")


@pytest.fixture(scope="module")
def registry():
    return plugin_registry(@MODULE@)


def test_the_@KIND@_meets_the_contract(registry) -> None:
    check("@KIND@", "@CHECKNAME@", registry)


def test_orch_reads_the_plugin_without_importing_torch() -> None:
    assert_light("@MODULE@")


@needs_install
def test_orch_plugins_lists_it(orch_workdir: Path) -> None:
    listed = {(i["kind"], i["name"]): i for i in json.loads(run_orch("plugins", "--json", cwd=orch_workdir).stdout)}
    assert listed[("@KIND@", "@NAME@")]["status"] == "ok"
    assert listed[("@KIND@", "@NAME@")]["distribution"] == "@DIST@"
'''

TESTS_EXTRA = {
    "loss": '''

def test_two_ranks_equal_one_rank_with_twice_the_batch() -> None:
    from orchestrator.testing import check_loss_distributed

    check_loss_distributed("@NAME@", "@MODULE@", temperature=0.1)


def test_the_loss_is_low_when_pairs_match(registry) -> None:
    import torch

    loss = build("loss", "@NAME@", registry)
    image = torch.eye(8, 16)
    assert loss({"image": image, "text": image})["loss"] < loss({"image": image, "text": image.roll(1, 0)})["loss"]
''',
    "encoder": '''

def test_embed_dim_is_an_option(registry) -> None:
    import torch

    encoder = build("encoder", "@NAME@", registry, embed_dim=32)
    images = torch.stack([encoder.transform(torch.rand(3, 40, 40)) for _ in range(2)])
    assert encoder(images).shape == (2, 32)
''',
    "dataset": '''

def test_the_same_seed_gives_the_same_data(registry) -> None:
    import torch

    a, b = build("dataset", "@NAME@", registry), build("dataset", "@NAME@", registry, seed=0)
    assert torch.equal(a.train.images, b.train.images) and a.test.labels == b.test.labels
''',
    "sampler": '''

def test_each_epoch_visits_every_index_at_most_once(registry) -> None:
    sampler = build("sampler", "@NAME@", registry)
    for epoch in range(3):
        seen = [i for batch in sampler.batches(50, None, 8, 0, epoch) for i in batch]
        assert len(seen) == len(set(seen)) == 48
''',
    "evaluator": '''

def test_it_returns_a_percentage(registry) -> None:
    from orchestrator.testing import eval_context

    result = build("evaluator", "@NAME@", registry).evaluate(eval_context(text=False))
    assert 0 <= result["top1"] <= 100
''',
    "tracker": '''

def test_it_writes_one_line_per_event(tmp_path: Path) -> None:
    from orchestrator.testing import check_tracker

    check_tracker(@MODULE@, run_dir=tmp_path)
    events = [json.loads(line)["event"] for line in (tmp_path / "@NAME@.jsonl").read_text().splitlines()]
    assert events == ["run_started", "metrics_logged", "checkpoint_saved", "run_ended"]
''',
}

USAGE = {
    "loss": "orch run --loss @NAME@ --steps 50",
    "encoder": "orch run --encoder @NAME@ --steps 50",
    "dataset": "orch run --data @NAME@ --steps 50",
    "sampler": "orch run --sampler @NAME@ --steps 50",
    "evaluator": "orch run --eval @NAME@ --steps 50",
    "tracker": "orch run --steps 50     # then read runs/<id>/@NAME@.jsonl",
}

README = '''\
# @DIST@

An orch plugin that adds the @KIND@ `@NAME@`.

```
pip install -e .            # orch finds it through the `orch` entry point in pyproject.toml
orch plugins                # lists it, with its options
@USAGE@
python -m pytest            # its tests, on orch's helpers (orchestrator.testing)
```

- `@MODULE@/__init__.py` registers it; it stays light (no torch): `orch plugins` imports it.
- `@MODULE@/@KIND@.py` is the implementation: a minimal, correct starting point whose docstring says
  what orch gives it and expects from it. @OPTIONS@
- `tests/` checks the contract of a @KIND@ with `orchestrator.testing.check`.

A plugin that fails to import is listed as broken by `orch plugins` and everything else keeps working;
`ORCH_DISABLE_PLUGINS=@NAME@` turns it off. The plugin contract is in orch's `docs/plugins.md`.
'''

OPTIONS = {
    kind: "Its keyword parameters, with type hints and defaults, are its options (`--" + flag + " @NAME@:key=value`); "
          "the first line of its docstring is the summary `orch plugins` shows."
    for kind, flag in (("loss", "loss"), ("encoder", "encoder"), ("dataset", "data"), ("sampler", "sampler"),
                       ("evaluator", "eval"))
}
OPTIONS["tracker"] = "A tracker has no options: read its settings from the environment, as MLflow's tracker does."


def names(name: str, kind: str) -> dict[str, str]:
    """The names derived from NAME: distribution, module and class (``my-loss`` -> ``MyLoss``, ``hinge`` ->
    ``HingeLoss``: the kind as a suffix keeps the class clear of the names the module imports)."""
    words = name.split("-")
    if words[-1] != kind:
        words.append(kind)
    return {"@NAME@": name, "@DIST@": f"orch-{name}", "@MODULE@": "orch_" + name.replace("-", "_"),
            "@CLASS@": "".join(word.capitalize() for word in words)}


def check_name(name: str, kind: str | None) -> None:
    if kind is None:
        raise UserError(f"say what the plugin adds with --kind: one of {', '.join(KINDS)}")
    if kind not in KINDS:
        raise UserError(f"--kind {kind!r} is not one of {', '.join(KINDS)}")
    if not NAME_RE.fullmatch(name) or len(name) > MAX_NAME:
        raise UserError(f"{name!r} is not a valid plugin name: use lowercase letters, digits and single hyphens, "
                        f"starting with a letter (at most {MAX_NAME} characters), e.g. my-{kind}")
    if name == "orch" or name.startswith("orch-"):
        raise UserError(f"write the name without the orch- prefix: the package is called orch-NAME "
                        f"(e.g. `orch plugins new {name.removeprefix('orch-') or 'my-' + kind} --kind {kind}`)")
    _check_free(name, kind)


def _check_free(name: str, kind: str) -> None:
    """Refuse a name that an installed plugin already uses (the new plugin would load as broken)."""
    from orchestrator.registry import Registry

    registry = Registry.load()
    if kind == "tracker":
        taken = {c.name: c for c in registry.trackers}
    else:
        taken = registry.components[kind]
    if name in taken:
        raise UserError(f"the {kind} {name!r} already exists (from {taken[name].distribution}): choose another name")


def render(template: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        template = template.replace(key, value)
    return template


def files(name: str, kind: str) -> dict[str, str]:
    """Relative path -> content of every file of the package."""
    values = names(name, kind)
    module = values["@MODULE@"]
    helpers = ["assert_light", "check", "installed", "plugin_registry", "run_orch"]
    if kind != "tracker":
        helpers.append("build")
    values.update({"@KIND@": kind, "@USAGE@": render(USAGE[kind], values), "@OPTIONS@": render(OPTIONS[kind], values),
                   "@CHECKNAME@": module if kind == "tracker" else name, "@HELPERS@": ", ".join(sorted(helpers))})
    if kind == "tracker":
        registration = TRACKER_HEAD + TRACKER_REGISTRATION
    else:
        registration = REGISTRATION_HEAD
        plural, call, help_text = REGISTRATIONS[kind]
        registration += render(REGISTRATION_HOOK, {"@PLURAL@": plural, "@CALL@": call, "@HELP@": help_text})
    out = {
        "pyproject.toml": PYPROJECT,
        "README.md": README,
        f"{module}/__init__.py": registration,
        f"{module}/{kind}.py": IMPLEMENTATIONS[kind],
        "tests/conftest.py": CONFTEST,
        f"tests/test_{module}.py": TESTS_HEAD + TESTS_EXTRA[kind],
    }
    return {path: render(content, values) for path, content in out.items()}


def new_plugin(name: str, kind: str | None, directory: Path) -> Path:
    """Write ``directory/orch-NAME/``; refuse (UserError, nothing written) a bad name or an existing target."""
    check_name(name, kind)
    directory = Path(directory).expanduser().absolute()
    target = directory / f"orch-{name}"
    if target.exists() or target.is_symlink():
        raise UserError(f"{target} already exists: choose another --dir or name, or remove it")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"--dir {directory} is not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".orch-{name}-", dir=directory))
    try:
        for path, content in files(name, kind).items():
            (staging / path).parent.mkdir(parents=True, exist_ok=True)
            (staging / path).write_text(content, encoding="utf-8")
        staging.chmod(0o777 & ~_umask())
        os.rename(staging, target)  # all or nothing; fails if the target appeared meanwhile
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot create {target}: {exc.strerror or exc}") from None
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
