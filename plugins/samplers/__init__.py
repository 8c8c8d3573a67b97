"""Built-in samplers: random, class-aware (class-balanced, unique-class), embedding-aware and curation ones."""

from orchestrator import hookimpl


@hookimpl
def register_samplers(register):
    register("random", "plugins.samplers.random:RandomSampler", needs=set())
    register("class-balanced", "plugins.samplers.class_balanced:ClassBalancedSampler", needs={"label"})
    register("unique-class", "plugins.samplers.unique_class:UniqueClassSampler", needs={"label"})
    register("hard-negative", "plugins.samplers.hard_negative:HardNegativeSampler", needs=set())
    register("metadata-balance", "plugins.samplers.metadata_balance:MetadataBalanceSampler", needs={"text"})
    register("semantic-prune", "plugins.samplers.semantic_prune:SemanticPruneSampler", needs=set())
