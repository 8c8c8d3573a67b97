"""Run specs: parse ``NAME:key=value`` choices, fill every default, check the composition, hash.

The resolved spec (every option filled in, plugin distributions and versions included) is what gets
stored, hashed and logged. Resolution happens once, in the process that queues the run.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal

from orchestrator.errors import UserError
from orchestrator.options import is_secret, mapping_text
from orchestrator.registry import Component, Option, Registry
from orchestrator.trainer import TRAINER_OPTIONS

SLOTS = {  # command-line flag -> component kind
    "data": "dataset",
    "encoder": "encoder",
    "text_encoder": "encoder",
    "loss": "loss",
    "sampler": "sampler",
    "eval": "evaluator",
}


def spec_components(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(kind, entry) for every component a resolved spec names, evaluators one by one."""
    for slot, kind in SLOTS.items():
        entries = spec.get(slot) or []
        for entry in entries if isinstance(entries, list) else [entries]:
            yield kind, entry


DEFAULTS = {"data": "mnist", "encoder": "vit", "text_encoder": "text-transformer", "loss": "infonce",
            "sampler": "random"}
DEFAULT_EVALS = {True: ["zs"], False: ["knn"]}  # with and without a text tower
DATA_FIELDS = {"image", "text", "label"}
# What a loss may need beyond the data fields, and the data field each one is made from.
DERIVED_NEEDS = {"views": "image", "image-tokens": "image", "text-tokens": "text"}


def data_needs(needs: set[str]) -> set[str]:
    """The dataset fields behind a component's ``needs`` (views are made from images, tokens from both)."""
    return {DERIVED_NEEDS.get(n, n) for n in needs} & DATA_FIELDS
MAX_CHOICE_LENGTH = 4096


@dataclass(frozen=True)
class ResolvedRun:
    spec: dict[str, Any]
    name: str

    @property
    def hash(self) -> str:
        return spec_hash(self.spec)


def canonical_json(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(spec).encode()).hexdigest()


# --- parsing ------------------------------------------------------------------------------------

def parse_choice(text: str) -> tuple[str, dict[str, str]]:
    """``"vit:depth=6,width=256"`` -> ``("vit", {"depth": "6", "width": "256"})``."""
    if len(text) > MAX_CHOICE_LENGTH:
        raise UserError(f"choice is {len(text)} characters long; the limit is {MAX_CHOICE_LENGTH}")
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise UserError(f"{text!r} names no component: write NAME or NAME:key=value,...")
    options: dict[str, str] = {}
    for item in _split_top_level(rest) if rest.strip() else []:
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"{item!r} in {text!r} is not key=value: write {name}:key=value,key=value")
        if key in options:
            raise UserError(f"option {key!r} is given twice in {text!r}")
        options[key] = value.strip()
    return name, options


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets, so ``dims=[512,256]`` and ``a={"b":1,"c":2}`` stay one item."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [s for s in items if s.strip()]


def parse_value(option: Option, raw: str, where: str) -> Any:
    """Parse ``raw`` by the option's type hint; the result is JSON-serialisable."""
    try:
        return _parse(option.type, raw.strip())
    except (ValueError, TypeError) as exc:
        raise UserError(f"{where}: option {option.name}={raw!r} is not {_expected(option.type)} ({exc})") from None


def _parse(tp: Any, raw: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        for allowed in args:
            try:
                if _parse(type(allowed), raw) == allowed:
                    return allowed
            except ValueError:
                continue
        raise ValueError(f"choose one of {', '.join(map(str, args))}")
    if origin in (typing.Union, UnionType):
        if raw.lower() in ("none", "null") and NoneType in args:
            return None
        errors = []
        for arg in (a for a in args if a is not NoneType):
            try:
                return _parse(arg, raw)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors))
    if origin is dict or tp is dict:
        return _parse_mapping(raw)
    if origin in (tuple, list):
        inner = raw[1:-1] if raw[:1] in "([" and raw[-1:] in ")]" else raw
        parts = [p.strip() for p in _split_top_level(inner)]
        element_types = [a for a in args if a is not Ellipsis] or [typing.Any]
        if origin is tuple and args and Ellipsis not in args and len(args) != len(parts):
            raise ValueError(f"expected {len(args)} values")
        return [_parse(element_types[min(i, len(element_types) - 1)], p) for i, p in enumerate(parts)]
    if tp is bool:
        lowered = raw.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ValueError("write true or false")
    if tp is int:
        return int(raw)
    if tp is float:
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError("must be finite")
        return value
    if tp is Path:
        if not raw:
            raise ValueError("empty path")
        return str(Path(raw).expanduser().absolute())
    if tp is str or tp is typing.Any or tp is inspect.Parameter.empty:
        return raw
    raise ValueError(f"orch cannot parse options of type {tp}")


def _parse_mapping(raw: str) -> dict[str, Any]:
    """``"a.b=1,a.c=true,d=cpu"`` -> ``{"a": {"b": 1, "c": True}, "d": "cpu"}``: dotted keys nest, and a value is
    JSON where it parses as JSON (numbers, true, null, [...], {...}), else the text itself. A JSON object is read
    as it is (a plugin's mapping option: ``--loss mine:weights={"a":1,"b":2}``)."""
    if len(raw) > MAX_CHOICE_LENGTH:
        raise ValueError(f"{len(raw)} characters long; the limit is {MAX_CHOICE_LENGTH}")
    if raw.startswith("{"):
        value = _parse_mapping(f"_={raw}")["_"]
        if not isinstance(value, dict):
            raise ValueError(f"{raw!r} is not a JSON object")
        return value
    out: dict[str, Any] = {}
    for item in _split_top_level(raw):
        key, eq, value = (part.strip() for part in item.partition("="))
        path = key.split(".")
        if not eq or not value or not all(path):
            raise ValueError(f"{item.strip()!r} is not key.path=value")
        try:
            value = json.loads(value, parse_constant=_refuse_constant)
        except (json.JSONDecodeError, RecursionError):
            pass  # text: cpu, nvme
        try:
            json.dumps(value, allow_nan=False)
        except ValueError:
            raise ValueError(f"{key} is not a finite number") from None  # 1e400 parses as inf
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{part} is given a value and keys")
        if path[-1] in node:
            raise ValueError(f"{key} is given twice")
        node[path[-1]] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")  # JSON's NaN and Infinity


def _expected(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) in (typing.Union, UnionType):
        return " or ".join(_expected(a) for a in typing.get_args(tp) if a is not NoneType)
    if typing.get_origin(tp) is dict:
        return "key.path=value pairs"
    names = {bool: "true or false", int: "an integer", float: "a number", Path: "a path", str: "a string"}
    return names.get(tp, f"a {getattr(tp, '__name__', str(tp))}")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


# --- resolution ---------------------------------------------------------------------------------

def resolve_component(component: Component, raw: dict[str, str], flag: str) -> dict[str, Any]:
    where = f"--{flag.replace('_', '-')} {component.name}"
    known = {o.name: o for o in component.options}
    for key in raw:
        if key not in known:
            valid = ", ".join(f"{o.name}={'<required>' if o.required else _json_default(o.default)}"
                              for o in component.options)
            raise UserError(f"{where}: unknown option {key!r}; valid options: {valid or 'none'}")
    options: dict[str, Any] = {}
    for opt in component.options:
        if opt.name in raw:
            options[opt.name] = parse_value(opt, raw[opt.name], where)
        elif opt.required:
            raise UserError(f"{where}: option {opt.name!r} is required: write --{flag.replace('_', '-')} "
                            f"{component.name}:{opt.name}=...")
        else:
            options[opt.name] = _json_default(opt.default)
    if component.resolve is not None:
        options = component.resolve(options)
    return {
        "name": component.name,
        "options": options,
        "plugin": {"distribution": component.distribution, "version": component.version},
    }


def resolve_trainer(raw: dict[str, str]) -> dict[str, Any]:
    values = {o.name: _json_default(o.default) for o in TRAINER_OPTIONS}
    for key, value in raw.items():
        option = next(o for o in TRAINER_OPTIONS if o.name == key)
        values[key] = parse_value(option, value, f"--{key.replace('_', '-')}")
    for key in ("steps", "batch_size", "gpus", "accum", "prefetch"):
        if values[key] != "all" and values[key] < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1, got {values[key]}")
    if values["warmup"] is None:
        values["warmup"] = values["steps"] // 10
    elif values["warmup"] >= values["steps"]:
        raise UserError(f"--warmup {values['warmup']} must be smaller than --steps {values['steps']}")
    for key in ("checkpoint_every", "eval_every", "warmup", "seed", "workers", "grad_cache"):
        if values[key] < 0:
            raise UserError(f"--{key.replace('_', '-')} must be 0 or more, got {values[key]}")
    if values["grad_cache"] and values["zero"] == 3:
        raise UserError("--grad-cache works with --zero 0, 1 or 2 (ZeRO-3 partitions the parameters outside "
                        "forwards): lower --zero or drop --grad-cache")
    for key in ("weight_decay", "weight_decay_end"):
        if values[key] is not None and values[key] < 0:
            raise UserError(f"--{key.replace('_', '-')} must be 0 or more, got {values[key]}")
    if values["lr"] <= 0:
        raise UserError(f"--lr must be positive, got {values['lr']}")
    if values["log_every"] < 1:
        raise UserError(f"--log-every must be at least 1, got {values['log_every']}")
    per_step = (1 if values["gpus"] == "all" else values["gpus"]) * values["accum"]  # "all": checked at launch
    if values["batch_size"] % per_step:
        raise UserError(f"--batch-size {values['batch_size']} is not divisible by --gpus x --accum = {per_step}: "
                        f"choose a multiple of {per_step}")
    if values["deepspeed"]:
        from orchestrator.engine.dsconfig import check_overrides

        check_overrides(values)
    return values


def resolve_run(registry: Registry, choices: dict[str, Any], trainer_raw: dict[str, str]) -> dict[str, Any]:
    """One run: ``choices`` maps each slot to ``"NAME:k=v"`` (``eval`` to a list of them)."""
    spec: dict[str, Any] = {}
    def choice(slot: str) -> str:
        return DEFAULTS[slot] if choices.get(slot) is None else choices[slot]

    loss_name, loss_raw = parse_choice(choice("loss"))
    loss = registry.get("loss", loss_name)
    needs_text = "text" in data_needs(set(loss.declared.get("needs", ())))
    components: dict[str, Component] = {"loss": loss}
    for slot in ("data", "encoder", "loss", "sampler"):
        name, raw = (loss_name, loss_raw) if slot == "loss" else parse_choice(choice(slot))
        components[slot] = registry.get(SLOTS[slot], name)
        spec[slot] = resolve_component(components[slot], raw, slot)

    encoder_modality = components["encoder"].declared.get("modality", "image")
    if encoder_modality == "text":
        raise UserError(f"--encoder {components['encoder'].name} is a text encoder: --encoder takes an image "
                        f"tower (or a shared one); give text towers with --text-encoder")
    shared = encoder_modality == "both"
    text_choice = choices.get("text_encoder")
    spec["text_encoder"] = None
    if needs_text and not shared:
        name, raw = parse_choice(choice("text_encoder"))
        components["text_encoder"] = registry.get("encoder", name)
        if components["text_encoder"].declared.get("modality") not in ("text", "both"):
            raise UserError(f"--text-encoder {name} is not a text encoder (its modality is "
                            f"{components['text_encoder'].declared.get('modality', 'image')})")
        spec["text_encoder"] = resolve_component(components["text_encoder"], raw, "text_encoder")
    elif text_choice is not None:
        why = f"--encoder {components['encoder'].name} is shared by both modalities" if shared else \
            f"--loss {loss.name} trains no text tower"
        raise UserError(f"--text-encoder {text_choice} is not used: {why}; drop --text-encoder")

    text_tower = needs_text or shared
    eval_choices = choices.get("eval")
    if eval_choices is None:
        eval_choices = [n for n in DEFAULT_EVALS[text_tower] if n in registry.components["evaluator"]]
    spec["eval"] = []
    for choice in eval_choices:
        name, raw = parse_choice(choice)
        components[f"eval:{name}"] = registry.get("evaluator", name)
        spec["eval"].append(resolve_component(components[f"eval:{name}"], raw, "eval"))
    check_composition(components, spec, text_tower)
    spec["trainer"] = resolve_trainer(trainer_raw)
    return spec


def check_composition(components: dict[str, Component], spec: dict[str, Any], text_tower: bool) -> None:
    """Refuse an impossible composition with one line naming both sides."""
    data = components["data"]
    provides = data.provides(spec["data"]["options"])
    side_data = f"dataset {data.name} (provides {', '.join(sorted(provides)) or 'nothing'})"
    for key, comp in components.items():
        if key == "data" or comp.kind == "encoder":
            continue
        needs = set(comp.declared.get("needs", ()))
        missing = data_needs(needs) - provides
        if missing:
            raise UserError(f"{comp.kind} {comp.name} needs {', '.join(sorted(missing))} but {side_data}: "
                            f"choose another --data or --{_flag(key)}")
        if "text-tower" in needs and not text_tower:
            raise UserError(f"{comp.kind} {comp.name} needs a text tower but loss {spec['loss']['name']} trains "
                            f"none: use an image-text --loss or drop --{_flag(key)} {comp.name}")
    loss_needs = set(components["loss"].declared.get("needs", ()))
    for need, slot in (("image-tokens", "encoder"), ("text-tokens", "text_encoder")):
        tower = components.get(slot) or components["encoder"]  # a shared tower serves both
        if need in loss_needs and not tower.declared.get("tokens"):
            raise UserError(f"loss {components['loss'].name} compares token features but encoder {tower.name} "
                            f"gives none (no tokens=True): choose a --{_flag(slot)} with token features")
    if text_tower and spec["text_encoder"] is not None:
        image_dim = spec["encoder"]["options"].get("embed_dim")
        text_dim = spec["text_encoder"]["options"].get("embed_dim")
        if image_dim is not None and text_dim is not None and image_dim != text_dim:
            raise UserError(f"encoder {spec['encoder']['name']} embeds into {image_dim} dims but text encoder "
                            f"{spec['text_encoder']['name']} into {text_dim}: give both the same embed_dim")


def _flag(key: str) -> str:
    return "eval" if key.startswith("eval:") else key.replace("_", "-")


def run_name(spec: dict[str, Any], registry: Registry) -> str:
    """A readable name: components with the options that differ from their defaults."""
    parts = []
    for slot in ("encoder", "text_encoder", "loss", "data"):
        entry = spec.get(slot)
        if not entry:
            continue
        comp = registry.components[SLOTS[slot]].get(entry["name"])
        changed = []
        for key, value in entry["options"].items():
            if is_secret(key):
                continue
            opt = comp.option(key) if comp else None
            if opt is None or opt.required or _json_default(opt.default) != value:
                changed.append(f"{key}={Path(value).name if isinstance(value, str) and '/' in value else value}")
        parts.append(entry["name"] + (f"({','.join(changed)})" if changed else ""))
    trainer = spec.get("trainer", {})
    changed = [f"{o.name}={mapping_text(v) if isinstance(v := trainer[o.name], dict) else v}" for o in TRAINER_OPTIONS
               if o.name in trainer and o.name != "warmup" and trainer[o.name] != o.default]
    return "-".join(parts) + (f" [{','.join(changed)}]" if changed else "")


def expand_grid(registry: Registry, choices: dict[str, list[str]], trainer_raw: dict[str, list[str]],
                name: str | None = None) -> list[ResolvedRun]:
    """The cartesian product of repeated flags (``--eval`` is a list per run, not a grid axis)."""
    axes = {slot: values for slot, values in choices.items() if slot != "eval" and values}
    trainer_axes = {k: v for k, v in trainer_raw.items() if v}
    runs = []
    keys, tkeys = list(axes), list(trainer_axes)
    for combo in itertools.product(*axes.values()):
        for tcombo in itertools.product(*trainer_axes.values()):
            picked = dict(zip(keys, combo))
            if choices.get("eval"):
                picked["eval"] = list(choices["eval"])
            spec = resolve_run(registry, picked, dict(zip(tkeys, tcombo)))
            runs.append(ResolvedRun(spec, name or run_name(spec, registry)))
    return runs
