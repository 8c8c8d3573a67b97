"""The command line, run as a user runs it (a real subprocess, a real store)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.store import Store
from tests.conftest import orch

HEAVY = ("torch", "deepspeed", "mlflow")


@pytest.mark.parametrize("args", [["--help"], ["ls"], ["plugins"], ["plugins", "--json"], ["queue", "--steps", "5"],
                                  ["show", "1"]])
def test_light_commands_import_no_torch(workdir: Path, args: list[str]) -> None:
    orch("queue", "--steps", "7", cwd=workdir)
    code = (f"import sys; sys.argv = ['orch', *{args!r}]\nfrom orchestrator import cli\ntry:\n    cli.main()\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\nassert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_queue_twice_says_which_run_has_the_spec(workdir: Path) -> None:
    first = orch("queue", "--loss", "infonce:temperature=0.05", "--steps", "10", cwd=workdir)
    assert first.returncode == 0 and "queued run 1" in first.stdout
    again = orch("queue", "--loss", "infonce:temperature=0.05", "--steps", "10", cwd=workdir)
    assert again.returncode == 0 and "run 1 (queued) already has this spec" in again.stdout
    forced = orch("queue", "--loss", "infonce:temperature=0.05", "--steps", "10", "--again", cwd=workdir)
    assert "queued run 2" in forced.stdout
    listing = json.loads(orch("ls", "--json", cwd=workdir).stdout)
    assert [r["id"] for r in listing] == [2, 1]
    assert (workdir / "experiments.db").exists()


def test_grid_queues_the_cartesian_product(workdir: Path) -> None:
    result = orch("queue", "--encoder", "vit:depth=1", "--encoder", "vit:depth=2", "--lr", "1e-3", "--lr", "1e-4",
                  cwd=workdir)
    assert result.stdout.count("queued run") == 4


@pytest.mark.parametrize("args, message", [
    (["queue", "--loss", "infonse"], "did you mean infonce"),
    (["queue", "--encoder", "vit:dpeth=2"], "valid options:"),
    (["queue", "--encoder", "vit:depth=deep"], "is not an integer"),
    (["queue", "--steps", "many"], "is not an integer"),
    (["queue", "--eval", "imagenet-zs"], "ORCH_IMAGENET_ROOT"),
    (["queue", "--eval", "imagenet-zs:root=/no/such/folder"], "/no/such/folder"),
    (["queue", "--encoder", "text-transformer"], "text encoder"),
    (["queue", "--data", "mnist:test_fraction=2"], "test_fraction"),
    (["--store", "postgresql+psycopg://u:pw@127.0.0.1:1/x", "queue"], "cannot open store"),
    (["show", "99"], "there is no run 99"),
    (["cancel", "99"], "there is no run 99"),
    (["queue", "--no-such-flag"], "No such option"),
])
def test_user_errors_are_one_line_exit_2_and_write_nothing(workdir: Path, args: list[str], message: str) -> None:
    orch("queue", "--steps", "3", cwd=workdir)  # one run already in the store
    result = orch(*args, cwd=workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "pw" not in result.stderr
    assert len(Store.open(f"sqlite:///{workdir}/experiments.db").runs()) == 1


def test_plugins_json_lists_every_component_with_its_options(workdir: Path) -> None:
    result = orch("plugins", "--json", cwd=workdir)
    items = json.loads(result.stdout)
    assert all(set(i) == {"kind", "name", "distribution", "version", "summary", "options", "status", "error"}
               for i in items)
    by_name = {(i["kind"], i["name"]): i for i in items}
    vit = by_name[("encoder", "vit")]
    assert vit["status"] == "ok" and vit["distribution"] == "orch" and vit["summary"]
    assert {"name": "depth", "type": "int"}.items() <= next(o for o in vit["options"] if o["name"] == "depth").items()
    assert ("tracker", "mlflow") in by_name


def test_disabled_plugin_disappears(workdir: Path) -> None:
    result = orch("plugins", "--json", cwd=workdir, env={"ORCH_DISABLE_PLUGINS": "mlflow"})
    assert "mlflow" not in [i["name"] for i in json.loads(result.stdout)]


def test_cancel_and_resume_a_queued_run(workdir: Path) -> None:
    orch("queue", "--steps", "3", cwd=workdir)
    assert "run 1 cancelled" in orch("cancel", "1", cwd=workdir).stdout
    shown = json.loads(orch("show", "1", "--json", cwd=workdir).stdout)
    assert shown["status"] == "cancelled"
    assert "from the start" in orch("resume", "1", cwd=workdir).stdout
    assert json.loads(orch("show", "1", "--json", cwd=workdir).stdout)["status"] == "queued"
    assert orch("resume", "1", cwd=workdir).returncode == 2  # only failed or cancelled runs


def test_compare_shows_spec_differences(workdir: Path) -> None:
    orch("queue", "--lr", "1e-3", "--lr", "3e-4", cwd=workdir)
    data = json.loads(orch("compare", "1", "2", "--json", cwd=workdir).stdout)
    assert set(data["differences"]) == {"trainer.lr"}
    text = orch("compare", "1", "2", cwd=workdir).stdout
    assert "trainer.lr" in text and "run 1" in text and "run 2" in text


def test_deepspeed_keys_are_shown_as_written_and_compared_one_by_one(workdir: Path) -> None:
    keys = "zero_optimization.overlap_comm=true,zero_optimization.reduce_bucket_size={}"
    queued = orch("queue", "--zero", "2", "--deepspeed", keys.format(1000), "--deepspeed", keys.format(2000),
                  cwd=workdir)
    assert queued.returncode == 0, queued.stderr
    assert "deepspeed=zero_optimization.overlap_comm=true,zero_optimization.reduce_bucket_size=1000]" in queued.stdout
    shown = orch("show", "1", cwd=workdir).stdout
    assert "deepspeed=zero_optimization.overlap_comm=true,zero_optimization.reduce_bucket_size=1000," in shown
    data = json.loads(orch("compare", "1", "2", "--json", cwd=workdir).stdout)
    assert set(data["differences"]) == {"trainer.deepspeed.zero_optimization.reduce_bucket_size"}
