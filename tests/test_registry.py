"""Plugin discovery: isolation of broken plugins, option introspection, and real pip-installed packages."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from orchestrator.registry import Registry, describe
from tests.conftest import orch

ROOT = Path(__file__).resolve().parents[1]


def _plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> EntryPoint:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    return EntryPoint(name=name, value=name, group="orch")


def test_a_raising_register_hook_breaks_only_its_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = _plugin(tmp_path, monkeypatch, "good_plugin", """
        from orchestrator import hookimpl
        def make(scale: float = 2.0):
            '''Scale things.'''
        @hookimpl
        def register_losses(register):
            register("scaled", make, needs={"image"})
    """)
    bad = _plugin(tmp_path, monkeypatch, "bad_plugin", """
        from orchestrator import hookimpl
        def make():
            '''Half registered.'''
        @hookimpl
        def register_losses(register):
            register("half", make)
            raise RuntimeError("register hook exploded")
    """)
    typo = _plugin(tmp_path, monkeypatch, "typo_plugin", """
        from orchestrator import hookimpl
        @hookimpl
        def register_lossez(register):
            pass
    """)
    registry = Registry.load([good, bad, typo])
    assert set(registry.components["loss"]) == {"scaled"}  # nothing half-registered survives
    broken = {b.name: b.error for b in registry.broken}
    assert broken["bad_plugin"] == "RuntimeError: register hook exploded"
    assert "unknown hook(s) register_lossez" in broken["typo_plugin"]
    assert registry.get("loss", "scaled").option("scale").default == 2.0


def test_two_plugins_cannot_take_the_same_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = """
        from orchestrator import hookimpl
        def make():
            '''A sampler.'''
        @hookimpl
        def register_samplers(register):
            register("random", make)
    """
    first = _plugin(tmp_path, monkeypatch, "first_plugin", src)
    second = _plugin(tmp_path, monkeypatch, "second_plugin", src)
    registry = Registry.load([first, second])
    assert "already registered" in registry.broken[0].error


def test_options_are_read_from_source_without_importing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "heavy_module.py").write_text(textwrap.dedent("""
        from typing import Literal
        raise ImportError("importing this module is not allowed in this test")

        class Tower:
            '''A tower.

            Longer text.
            '''
            def __init__(self, depth: int = 4, pool: Literal["cls", "mean"] = "cls", dims: tuple[int, ...] = (8, 4),
                         *, name: str | None = None, weights: dict[str, Any] | None = None) -> None:
                pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    summary, options = describe("heavy_module:Tower")
    assert summary == "A tower."
    assert [(o.name, o.type_name, o.default) for o in options] == [
        ("depth", "int", 4), ("pool", "cls|mean", "cls"), ("dims", "tuple[int, ...]", (8, 4)),
        ("name", "str | None", None), ("weights", "key.path=value,... | None", None)]


def _pip_target(tmp_path: Path, *packages: Path) -> Path:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), *map(str, packages)], check=True, capture_output=True)
    return target


@pytest.mark.slow
def test_pip_installed_plugins_appear_work_and_break_alone(workdir: Path) -> None:
    site = _pip_target(workdir, ROOT / "examples" / "orch-plugin-example",
                       ROOT / "tests" / "fixtures" / "broken-plugin")
    env = {"PYTHONPATH": f"{site}:{ROOT}"}
    listed = {(i["kind"], i["name"]): i for i in json.loads(orch("plugins", "--json", cwd=workdir, env=env).stdout)}
    example = listed[("loss", "vse-hinge")]
    assert (example["distribution"], example["version"], example["status"]) == ("orch-plugin-example", "0.1.0", "ok")
    broken = listed[("plugin", "broken")]
    assert broken["status"] == "broken" and "orch_dependency_that_is_not_installed" in broken["error"]
    assert ("encoder", "vit") in listed  # the built-ins are untouched
    assert orch("ls", cwd=workdir, env=env).returncode == 0

    result = orch("run", "--loss", "vse-hinge", "--steps", "4", "--batch-size", "32", "--quiet", cwd=workdir, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    shown = json.loads(orch("show", "1", "--json", cwd=workdir, env=env).stdout)
    assert shown["status"] == "finished"
    assert shown["spec"]["loss"]["plugin"] == {"distribution": "orch-plugin-example", "version": "0.1.0"}
    assert "zs/top1" in shown["metrics"]
