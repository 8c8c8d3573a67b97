"""Loss options checked without torch: at ``orch queue`` (``resolve=``) and in the constructors alike."""

from __future__ import annotations

from typing import Any

from orchestrator.errors import UserError


def check_tile(tile: int) -> None:
    if tile < 0:
        raise ValueError(f"tile={tile} must be 0 (the whole similarity matrix at once) or a number of rows, "
                         f"e.g. 4096")


def resolve_tiled(options: dict[str, Any]) -> dict[str, Any]:
    """Queue time: ``check_tile`` as one ``UserError`` line."""
    try:
        check_tile(options["tile"])
    except ValueError as exc:
        raise UserError(f"--loss: {exc}") from None
    return options
