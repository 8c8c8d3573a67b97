"""Built-in samplers."""

from orchestrator import hookimpl


@hookimpl
def register_samplers(register):
    register("random", "plugins.samplers.random:RandomSampler", needs=set())
