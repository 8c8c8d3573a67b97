pytest_plugins = ["orchestrator.testing"]  # orch's helpers for plugin authors: the orch_workdir fixture
