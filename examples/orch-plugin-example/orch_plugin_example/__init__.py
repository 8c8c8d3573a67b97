"""Example orch plugin: one component of each kind, and a tracker that writes run events as JSON lines.

This module is what the ``orch`` entry point names: it registers ``"module:Class"`` strings, so orch
reads the options from the source and ``orch plugins`` never imports torch. The tracker's lifecycle
hooks (torch-free) are imported here, so this entry point is also listed as the tracker ``example``.
"""

from orch_plugin_example.events import checkpoint_saved, metrics_logged, run_ended, run_started
from orchestrator import hookimpl

__all__ = ["checkpoint_saved", "metrics_logged", "run_ended", "run_started"]


@hookimpl
def register_datasets(register):
    register("example-shapes", "orch_plugin_example.shapes:Shapes", provides={"image", "text", "label"})


@hookimpl
def register_encoders(register):
    register("example-mlp", "orch_plugin_example.mlp:MLPEncoder", modality="image")


@hookimpl
def register_losses(register):
    register("vse-hinge", "orch_plugin_example.hinge:HardestNegativeHinge", needs={"image", "text"})


@hookimpl
def register_samplers(register):
    register("example-stratified", "orch_plugin_example.stratified:StratifiedSampler", needs={"label"})


@hookimpl
def register_evaluators(register):
    register("example-centroid", "orch_plugin_example.centroid:NearestCentroid", needs={"label"})
