"""Built-in samplers: random, class-aware (class-balanced, unique-class), embedding-aware and curation ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator import hookimpl
from orchestrator.errors import UserError


def _embeddings_file(options: dict[str, Any]) -> dict[str, Any]:
    """Queue time: semantic-prune's ``embeddings`` file must exist; stored absolute (workers run elsewhere)."""
    if options.get("embeddings") is None:
        return options
    path = Path(options["embeddings"]).expanduser().absolute()
    if not path.is_file() or path.suffix not in (".npy", ".pt"):
        raise UserError(f"--sampler semantic-prune: embeddings={options['embeddings']} is not a .npy or .pt file: "
                        f"save the [N, D] train embeddings (rows in train-split order) with numpy.save or torch.save")
    return {**options, "embeddings": str(path)}


@hookimpl
def register_samplers(register):
    register("random", "plugins.samplers.random:RandomSampler", needs=set())
    register("class-balanced", "plugins.samplers.class_balanced:ClassBalancedSampler", needs={"label"})
    register("unique-class", "plugins.samplers.unique_class:UniqueClassSampler", needs={"label"})
    register("hard-negative", "plugins.samplers.hard_negative:HardNegativeSampler", needs=set())
    register("metadata-balance", "plugins.samplers.metadata_balance:MetadataBalanceSampler", needs={"text"})
    register("semantic-prune", "plugins.samplers.semantic_prune:SemanticPruneSampler", needs=set(),
             resolve=_embeddings_file)
