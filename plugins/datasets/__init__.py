"""Built-in datasets: real handwritten digits that ship with installed packages (no download)."""

from __future__ import annotations

from typing import Any

from orchestrator import hookimpl
from orchestrator.errors import UserError

PROVIDES = {"image", "text", "label"}


def _check_fraction(options: dict[str, Any]) -> dict[str, Any]:
    fraction = options.get("test_fraction")
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise UserError(f"--data: test_fraction={fraction} must be between 0 and 1 (exclusive), e.g. 0.2")
    return options


@hookimpl
def register_datasets(register: Any) -> None:
    register("mnist", "plugins.datasets.mnist:MNIST", provides=PROVIDES, resolve=_check_fraction)
    register("digits", "plugins.datasets.digits:Digits", provides=PROVIDES, resolve=_check_fraction)
