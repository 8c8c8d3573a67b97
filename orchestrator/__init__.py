"""orch: a config-free, plugin-based orchestrator for contrastive and self-supervised pre-training."""

from orchestrator.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
