"""The plugin author kit: `orch plugins new` packages install and pass their own tests, the helpers in
orchestrator.testing catch broken plugins, and docs/plugins.md covers every hook."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator import hookspecs
from orchestrator.scaffold import KINDS, files
from orchestrator.testing import PluginError, check, check_loss_distributed, plugin_registry, run_orch

ROOT = Path(__file__).resolve().parents[1]


# --- orch plugins new: refusals and what it writes -------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["My-Loss", "--kind", "loss"], "not a valid plugin name"),
    (["my_loss", "--kind", "loss"], "not a valid plugin name"),
    (["2fast", "--kind", "loss"], "not a valid plugin name"),
    (["a--b", "--kind", "loss"], "not a valid plugin name"),
    (["../evil", "--kind", "loss"], "not a valid plugin name"),
    (["x" * 60, "--kind", "loss"], "not a valid plugin name"),
    (["orch-hinge", "--kind", "loss"], "without the orch- prefix"),
    (["infonce", "--kind", "loss"], "already exists (from orch)"),
    (["mine", "--kind", "optimizer"], "'optimizer' is not one of"),
    (["mine"], "say what the plugin adds with --kind: one of loss, encoder"),
    (["taken", "--kind", "sampler"], "already exists"),
    (["mine", "--kind", "loss", "--dir", "a-file"], "is a file"),
])
def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "orch-taken").mkdir()
    (tmp_path / "a-file").write_text("")
    before = sorted(tmp_path.rglob("*"))
    result = run_orch("plugins", "new", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_plugins_is_still_the_listing(tmp_path: Path) -> None:
    listed = json.loads(run_orch("plugins", "--json", cwd=tmp_path).stdout)
    assert ("loss", "infonce") in {(i["kind"], i["name"]) for i in listed}
    assert "infonce" in run_orch("plugins", cwd=tmp_path).stdout
    assert "new" in run_orch("plugins", "--help", cwd=tmp_path).stdout


def test_every_kind_generates_a_light_package_orch_reads_without_installing(tmp_path: Path) -> None:
    result = run_orch("plugins", "new", "my-loss", "--kind", "loss", "--dir", str(tmp_path / "made"), cwd=tmp_path)
    assert result.returncode == 0 and "pip install -e ." in result.stdout, result.stderr
    assert sorted(p.relative_to(tmp_path / "made").as_posix() for p in (tmp_path / "made").rglob("*.*")) == [
        "orch-my-loss/README.md", "orch-my-loss/orch_my_loss/__init__.py", "orch-my-loss/orch_my_loss/loss.py",
        "orch-my-loss/pyproject.toml", "orch-my-loss/tests/conftest.py", "orch-my-loss/tests/test_orch_my_loss.py"]
    for kind in KINDS[1:]:
        for path, content in files(f"my-{kind}", kind).items():
            (tmp_path / f"orch-my-{kind}" / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / f"orch-my-{kind}" / path).write_text(content)
    modules = [f"orch_my_{kind}" for kind in KINDS]
    code = textwrap.dedent(f"""
        import json, sys
        sys.path[:0] = {[str(tmp_path / 'made' / 'orch-my-loss')] + [str(tmp_path / f'orch-my-{k}') for k in KINDS[1:]]}
        from orchestrator.testing import plugin_registry
        registry = plugin_registry(*{modules!r})
        out = {{c.kind + ' ' + c.name: [c.summary, [o.name for o in c.options]] for c in registry.all()}}
        out['heavy'] = [m for m in ('torch', 'deepspeed', 'mlflow') if m in sys.modules]
        print(json.dumps(out))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout.splitlines()[-1])
    assert listed.pop("heavy") == []
    assert listed["loss my-loss"][1] == ["temperature"]
    assert listed["encoder my-encoder"][1] == ["image_size", "channels", "hidden", "embed_dim"]
    assert listed["tracker orch_my_tracker"][0].startswith("orch-my-tracker")
    assert {key.split()[0] for key in listed} == set(KINDS)
    assert all(summary for summary, _ in listed.values())


def test_class_names_keep_clear_of_imports() -> None:
    assert "class FLoss(nn.Module)" in files("f", "loss")["orch_f/loss.py"]
    assert "class MyLoss(nn.Module)" in files("my-loss", "loss")["orch_my_loss/loss.py"]
    assert "class PreprocessEncoder(nn.Module)" in files("preprocess", "encoder")["orch_preprocess/encoder.py"]


# --- generated packages, installed with pip, pass their own tests and run in orch -----------------------

@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Every kind generated by `orch plugins new` and pip-installed (--target) into one site folder."""
    root = tmp_path_factory.mktemp("generated")
    for kind in KINDS:
        result = run_orch("plugins", "new", f"my-{kind}", "--kind", kind, cwd=root)
        assert result.returncode == 0, result.stderr
    site = root / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(site), *[str(root / f"orch-my-{kind}") for kind in KINDS]],
                   check=True, capture_output=True)
    return root, site


def _pytest(*args: str, cwd: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{site}:{ROOT}"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_the_generated_loss_package_passes_its_own_tests(generated: tuple[Path, Path]) -> None:
    """As its author runs them: `python -m pytest` in its folder, once installed."""
    root, site = generated
    result = _pytest(cwd=root / "orch-my-loss", site=site)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "5 passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-3000:]
    assert "PASSED tests/test_orch_my_loss.py::test_two_ranks_equal_one_rank_with_twice_the_batch" in result.stdout


@pytest.mark.slow
def test_every_other_generated_package_passes_its_own_tests(generated: tuple[Path, Path]) -> None:
    root, site = generated
    others = [kind for kind in KINDS if kind != "loss"]
    result = _pytest(*[str(root / f"orch-my-{kind}") for kind in others], cwd=root, site=site)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "skipped" not in result.stdout and "failed" not in result.stdout
    for kind in others:
        passed = len(re.findall(f"^PASSED .*test_orch_my_{kind}.py::", result.stdout, re.MULTILINE))
        assert passed == 4, f"{kind}: {passed} tests passed\n{result.stdout[-3000:]}"


@pytest.mark.slow
def test_generated_plugins_are_listed_and_train_together(generated: tuple[Path, Path]) -> None:
    root, site = generated
    env = {"PYTHONPATH": f"{site}:{ROOT}", "ORCH_DISABLE_PLUGINS": "mlflow"}
    listed = {(i["kind"], i["name"]): i for i in json.loads(run_orch("plugins", "--json", cwd=root, env=env).stdout)}
    for kind in KINDS:
        item = listed[(kind, f"my-{kind}")]
        assert (item["status"], item["distribution"], item["version"]) == ("ok", f"orch-my-{kind}", "0.1.0")

    work = root / "work"
    work.mkdir()
    result = run_orch("run", "--data", "my-dataset", "--encoder", "my-encoder", "--loss", "my-loss", "--sampler",
                      "my-sampler", "--eval", "my-evaluator", "--steps", "4", "--batch-size", "32", "--quiet",
                      cwd=work, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    shown = json.loads(run_orch("show", "1", "--json", cwd=work, env=env).stdout)
    assert shown["status"] == "finished" and "my-evaluator/top1" in shown["metrics"]
    events = [json.loads(line)["event"] for line in (work / "runs" / "1" / "my-tracker.jsonl").read_text().splitlines()]
    assert events[0] == "run_started" and events[-1] == "run_ended" and "checkpoint_saved" in events


# --- the helpers catch what is broken -----------------------------------------------------------------

def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> str:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT}")  # for spawned ranks
    return name


LOCAL_LOSS = """
    import torch, torch.nn.functional as F
    from torch import nn
    from orchestrator import hookimpl

    class Local(nn.Module):
        '''InfoNCE over this rank's batch only: wrong with several ranks.'''
        def __init__(self, temperature: float = 0.1) -> None:
            super().__init__()
            self.temperature = temperature
        def forward(self, batch):
            logits = F.normalize(batch["image"], dim=-1) @ F.normalize(batch["text"], dim=-1).T / self.temperature
            return {"loss": F.cross_entropy(logits, torch.arange(len(logits))), "logits": logits}

    @hookimpl
    def register_losses(register):
        register("local", Local, needs={"image", "text"})
"""


def test_check_rejects_a_loss_that_returns_a_non_scalar(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    registry = plugin_registry(_module(tmp_path, monkeypatch, "local_loss", LOCAL_LOSS))
    with pytest.raises(AssertionError, match="out\\['logits'\\] must be a scalar tensor"):
        check("loss", "local", registry)


@pytest.mark.slow
def test_distributed_check_rejects_a_loss_that_does_not_gather(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _module(tmp_path, monkeypatch, "gatherless_loss", LOCAL_LOSS.replace(', "logits": logits', ""))
    check("loss", "local", plugin_registry(name))  # correct on one rank
    with pytest.raises(AssertionError, match="gather_with_grad"):
        check_loss_distributed("local", name)


def test_check_rejects_a_sampler_that_is_not_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _module(tmp_path, monkeypatch, "bad_sampler", """
        import random
        from orchestrator import hookimpl

        class Unseeded:
            '''Shuffles with the global RNG.'''
            def batches(self, n, labels, batch_size, seed, epoch):
                order = random.sample(range(n), n)
                return [order[i:i + batch_size] for i in range(0, n - n % batch_size, batch_size)]
            def state_dict(self):
                return {}
            def load_state_dict(self, state):
                pass

        @hookimpl
        def register_samplers(register):
            register("unseeded", Unseeded)
    """)
    with pytest.raises(AssertionError, match="deterministic from \\(seed, epoch\\)"):
        check("sampler", "unseeded", plugin_registry(name))


def test_a_broken_plugin_fails_the_test_with_its_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _module(tmp_path, monkeypatch, "half_plugin", """
        from orchestrator import hookimpl
        @hookimpl
        def register_losses(register):
            raise RuntimeError("register hook exploded")
    """)
    with pytest.raises(PluginError, match="plugin half_plugin is broken: RuntimeError: register hook exploded"):
        plugin_registry(name)
    assert plugin_registry(name, strict=False).broken[0].name == name


# --- docs/plugins.md ------------------------------------------------------------------------------

def test_the_plugin_docs_cover_every_hook_and_helper() -> None:
    docs = (ROOT / "docs" / "plugins.md").read_text()
    hooks = [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "orch_spec")]
    assert len(hooks) >= 9
    for name in hooks:
        assert f"`{name}(" in docs, f"docs/plugins.md does not document the hook {name}"
    import orchestrator.testing

    for name in orchestrator.testing.__all__:
        assert f"`{name}" in docs, f"docs/plugins.md does not document orchestrator.testing.{name}"
    for phrase in ("orch plugins new", "ORCH_DISABLE_PLUGINS", "pytest_plugins", '"module:Class"'):
        assert phrase in docs
