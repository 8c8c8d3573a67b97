"""Ranks that would run different code refuse to start (orchestrator/engine/software.py).

Two ranks on one machine see different installs of the same plugin, as two hosts would: a ``sitecustomize`` on
the path puts ``rank<RANK>/`` first, where each rank finds its own copy of the plugin package."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.store import Store
from tests.conftest import install_module_plugin, orch
from tests.engine.conftest import SMALL

pytestmark = pytest.mark.slow

PLUGIN = '''from orchestrator import hookimpl
from plugins.losses.infonce import InfoNCE


class Drift(InfoNCE):
    """CLIP's loss, as checked out on {where}."""


@hookimpl
def register_losses(register):
    register("drift", "orch_drift_plugin:Drift", needs={{"image", "text"}})
'''


@pytest.mark.parametrize("differ", ["source", "version"])
def test_ranks_with_different_plugin_code_refuse_to_start(workdir: Path, differ: str) -> None:
    site = workdir / "site"
    install_module_plugin(site / "rank0", "orch-drift-plugin", "0.1", PLUGIN.format(where="host A"))
    install_module_plugin(site / "rank1", "orch-drift-plugin", "0.2" if differ == "version" else "0.1",
                          PLUGIN.format(where="host B" if differ == "source" else "host A"))
    (site / "sitecustomize.py").write_text("import os, sys\n"  # the ranks' PYTHONPATH: rank<RANK>/ first
                                           "here = os.path.dirname(__file__)\n"
                                           "rank = 'rank' + os.environ.get('RANK', '0')\n"
                                           "sys.path.insert(0, os.path.join(here, rank))\n")
    env = {"PYTHONPATH": f"{site}:{Path(__file__).resolve().parents[2]}"}

    result = orch("run", *SMALL, "--loss", "drift", "--gpus", "2", "--max-attempts", "2", cwd=workdir, env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    run = Store.open(f"sqlite:///{workdir}/experiments.db").run(1)
    assert run["status"] == "failed" and run["attempt"] == 1, run  # not retried: another try cannot help
    error = run["error"]
    assert "\n" not in error and "rank 1 (host " in error and "rank 0 (host " in error, error
    assert "loss drift is orch-drift-plugin" in error and "install the same versions on every host" in error, error
    assert ("0.2" in error) == (differ == "version"), error
    assert Store.open(f"sqlite:///{workdir}/experiments.db").metrics(1) == []  # refused before the first step
