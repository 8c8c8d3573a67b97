"""Built-in orch components, registered through the `orch` entry points like any third-party plugin."""
