"""orch: a config-free, plugin-based orchestrator for contrastive and self-supervised pre-training."""

from typing import Any

__all__ = ["hookimpl"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``from orchestrator import hookimpl`` loads pluggy only when a plugin asks for it (``orch ls`` does not)."""
    if name == "hookimpl":
        from orchestrator.hookspecs import hookimpl

        return hookimpl
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
