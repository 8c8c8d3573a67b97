"""Options: how a component's or the trainer's option is described, named and kept secret.

Light on purpose (no pluggy, no entry points): ``orch ls``, ``show`` and ``--help`` import only this.
"""

from __future__ import annotations

import inspect
import json
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_MISSING = inspect.Parameter.empty


@dataclass(frozen=True)
class Option:
    name: str
    type: Any  # the annotation object (int, float, Literal[...], ...)
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        return self.default is _MISSING

    @property
    def type_name(self) -> str:
        return type_name(self.type)


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if tp is _MISSING:
        return "any"
    if typing.get_origin(tp) is dict:
        return "key.path=value,..."
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # "int | all", "str | None"
        return " | ".join("None" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "").replace("pathlib.", "")


def leaves(mapping: dict[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """``(key path, value)`` for every value of a nested mapping that is not itself a non-empty mapping."""
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def mapping_text(mapping: dict[str, Any]) -> str:
    """A mapping option's value as it is written on the command line, ``key.path=value,...`` (values in JSON)."""
    return ",".join(f"{'.'.join(path)}={json.dumps(value, separators=(',', ':'))}" for path, value in leaves(mapping))


# --- secrets ------------------------------------------------------------------------------------

SECRET_PARTS = {"token", "key", "password", "passwd", "secret", "apikey", "credential", "credentials"}
SECRET_WORDS = ("password", "secret")
MASK = "***"


def is_secret(name: str) -> bool:
    """Options named like credentials (``api_key``, ``hf_token``, ``db_password``) are never logged or printed."""
    low = name.lower()
    return any(w in low for w in SECRET_WORDS) or bool(SECRET_PARTS & set(re.split(r"[_\-]", low)))


def masked(value: Any) -> Any:
    """A copy of a spec with the values of secret-looking keys replaced by ``***``."""
    if isinstance(value, dict):
        return {k: MASK if is_secret(str(k)) else masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value
