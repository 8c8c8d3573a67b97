"""The engine: compose the components of a run, synthesise the DeepSpeed config, train, checkpoint, evaluate."""
