"""Discover plugins through the ``orch`` entry points and describe their components.

Each entry point is loaded in isolation: one that fails to import, or whose register hook raises, is
recorded as broken with its error and everything else keeps working. Options are read from the
component's signature; for ``"module:attr"`` components the signature is read from the source with
``ast`` so that listing and validating never imports torch.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import os
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

import pluggy

from orchestrator import hookspecs
from orchestrator.errors import UserError
from orchestrator.options import _MISSING, Option

KINDS = ("dataset", "encoder", "loss", "sampler", "evaluator")
GROUP = "orch"
DISABLE_ENV = "ORCH_DISABLE_PLUGINS"  # comma-separated entry point names to skip

@dataclass
class Component:
    kind: str
    name: str
    target: Any  # class, factory, or "module:attr"
    distribution: str
    version: str
    summary: str = ""
    options: list[Option] = field(default_factory=list)
    declared: dict[str, Any] = field(default_factory=dict)
    resolve: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    status: str = "ok"
    error: str | None = None

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def provides(self, options: dict[str, Any]) -> set[str]:
        """A dataset's fields: ``provides=`` is a set, or a light function of the resolved options (labels
        from an optional column are there only when the column is named)."""
        declared = self.declared.get("provides", ())
        return set(declared(options) if callable(declared) else declared)

    def load(self) -> Callable[..., Any]:
        """Import the component (heavy: this is where torch comes in)."""
        if not isinstance(self.target, str):
            return self.target
        module, _, attr = self.target.partition(":")
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    def build(self, options: dict[str, Any]) -> Any:
        return self.load()(**options)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "summary": self.summary,
            "options": [
                {"name": o.name, "type": o.type_name, "default": None if o.required else o.default,
                 "required": o.required}
                for o in self.options
            ],
            "status": self.status,
            "error": self.error,
        }


class Registry:
    """Every component and tracker found through the ``orch`` entry points."""

    def __init__(self) -> None:
        self.components: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
        self.broken: list[Component] = []
        self.trackers: list[Component] = []
        self.pm = pluggy.PluginManager(GROUP)
        self.pm.add_hookspecs(hookspecs)

    @classmethod
    def load(cls, eps: list[EntryPoint] | None = None) -> Registry:
        registry = cls()
        disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        if eps is None:
            eps = sorted(entry_points(group=GROUP), key=lambda e: (e.dist.name if e.dist else "", e.name))
        for ep in eps:
            if ep.name not in disabled:
                registry._load_entry_point(ep)
        return registry

    def _load_entry_point(self, ep: EntryPoint) -> None:
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        try:
            module = ep.load()
            self.pm.register(module, name=f"{dist}:{ep.name}")
            unknown = [n for n in _hookimpl_names(module) if getattr(self.pm.hook, n).spec is None]
            if unknown:
                raise RuntimeError(f"implements unknown hook(s) {', '.join(unknown)}")
        except Exception as exc:  # noqa: BLE001 - any failure of a plugin is recorded, never raised
            self._broken(ep.name, dist, version, exc)
            return
        registered: list[Component] = []
        try:
            for kind in KINDS:
                impl = getattr(module, f"register_{_plural(kind)}", None)
                if impl is not None:
                    impl(register=self._register_callback(kind, dist, version, registered))
        except Exception as exc:  # noqa: BLE001
            for c in registered:
                del self.components[c.kind][c.name]
            self.pm.unregister(module)
            self._broken(ep.name, dist, version, exc)
            return
        if any(n in _hookimpl_names(module) for n in _LIFECYCLE_HOOKS):
            doc = (module.__doc__ or "").strip().splitlines()
            self.trackers.append(Component("tracker", ep.name, module, dist, version, doc[0] if doc else ""))

    def _broken(self, name: str, dist: str, version: str, exc: BaseException) -> None:
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        self.broken.append(Component("plugin", name, None, dist, version, status="broken", error=error))

    def _register_callback(self, kind: str, dist: str, version: str, registered: list[Component]):
        def register(name: str, component: Any, *, resolve: Callable | None = None, **declared: Any) -> None:
            if name in self.components[kind]:
                other = self.components[kind][name]
                raise RuntimeError(f"{kind} {name!r} is already registered by {other.distribution}")
            summary, options = describe(component)
            c = Component(kind, name, component, dist, version, summary, options, declared, resolve)
            self.components[kind][name] = c
            registered.append(c)

        return register

    def get(self, kind: str, name: str) -> Component:
        try:
            return self.components[kind][name]
        except KeyError:
            names = sorted(self.components[kind])
            near = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = f"did you mean {', '.join(near)}?" if near else f"available: {', '.join(names) or 'none'}"
            broken = [b.name for b in self.broken]
            extra = f" (broken plugins: {', '.join(broken)}; see `orch plugins`)" if broken else ""
            raise UserError(f"unknown {kind} {name!r}: {hint}{extra}") from None

    def notify(self, hook: str, **kwargs: Any) -> None:
        """Call a lifecycle hook on every plugin; one that raises warns and never stops the run."""
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            try:
                impl.function(**{name: kwargs[name] for name in impl.argnames})
            except Exception as exc:  # noqa: BLE001
                warnings.warn(f"plugin {impl.plugin_name} failed in {hook}: {type(exc).__name__}: {exc}; "
                              f"the run continues", stacklevel=2)

    def all(self) -> list[Component]:
        comps = [c for kind in KINDS for c in sorted(self.components[kind].values(), key=lambda c: c.name)]
        return comps + self.trackers + self.broken


_LIFECYCLE_HOOKS = ("run_started", "metrics_logged", "checkpoint_saved", "run_ended")


def _plural(kind: str) -> str:
    return {"loss": "losses"}.get(kind, kind + "s")


def _hookimpl_names(module: Any) -> list[str]:
    return [n for n, v in vars(module).items() if callable(v) and hasattr(v, "orch_impl")]


# --- reading options -----------------------------------------------------------------------------

def describe(component: Any) -> tuple[str, list[Option]]:
    """The summary line and the options of a component, without importing a "module:attr" target."""
    if isinstance(component, str):
        try:
            return _describe_source(component)
        except (_NotStatic, OSError, SyntaxError):
            module, _, attr = component.partition(":")
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            component = obj
    return _describe_object(component)


def _describe_object(obj: Any) -> tuple[str, list[Option]]:
    doc = inspect.getdoc(obj) or ""
    hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    options = [
        Option(p.name, hints.get(p.name, _MISSING), p.default)
        for p in inspect.signature(obj).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    return (doc.splitlines()[0] if doc else ""), options


class _NotStatic(Exception):
    """The signature cannot be read from the source alone; import the module instead."""


_TYPE_NAMESPACE = {
    "int": int, "float": float, "bool": bool, "str": str, "tuple": tuple, "list": list, "None": None,
    "Path": Path, "pathlib": __import__("pathlib"), "typing": typing, "Literal": typing.Literal,
    "Optional": typing.Optional, "Union": typing.Union, "dict": dict, "Any": typing.Any,
}


def _describe_source(target: str) -> tuple[str, list[Option]]:
    module, _, attr = target.partition(":")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise _NotStatic
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    node = next((n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))
                 and n.name == attr), None)
    if node is None:
        raise _NotStatic
    doc = ast.get_docstring(node) or ""
    func = node
    if isinstance(node, ast.ClassDef):
        func = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if func is None:
            if node.bases:  # inherited __init__: only an import can tell
                raise _NotStatic
            return (doc.splitlines()[0] if doc else ""), []
    args = func.args
    positional = args.posonlyargs + args.args
    if isinstance(node, ast.ClassDef):
        positional = positional[1:]  # self
    if args.posonlyargs:
        raise _NotStatic
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    pairs = list(zip(positional, defaults)) + list(zip(args.kwonlyargs, args.kw_defaults))
    options = []
    for arg, default in pairs:
        tp = _MISSING
        if arg.annotation is not None:
            try:
                tp = eval(ast.unparse(arg.annotation), {"__builtins__": {}}, _TYPE_NAMESPACE)  # noqa: S307
            except Exception:  # noqa: BLE001 - a name we do not know statically
                raise _NotStatic from None
        value = _MISSING
        if default is not None:
            try:
                value = ast.literal_eval(default)
            except ValueError:
                raise _NotStatic from None
        options.append(Option(arg.arg, tp, value))
    return (doc.splitlines()[0] if doc else ""), options
