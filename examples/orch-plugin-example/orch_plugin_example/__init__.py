"""Example orch plugin: registers one loss, exactly as the built-ins do (no torch import here)."""

from orchestrator import hookimpl


@hookimpl
def register_losses(register):
    register("vse-hinge", "orch_plugin_example.hinge:HardestNegativeHinge", needs={"image", "text"})
