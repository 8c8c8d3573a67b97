"""Built-in trackers: plugins on the run lifecycle hooks."""
