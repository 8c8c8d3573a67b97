"""Shared fixtures: a scratch working directory, real SQLite and PostgreSQL stores, the CLI in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_ADMIN = os.environ.get("ORCH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory with its own default store, runs folder and MLflow store."""
    monkeypatch.chdir(tmp_path)
    for var in ("ORCH_STORE", "ORCH_RUNS_DIR", "MLFLOW_TRACKING_URI", "ORCH_IMAGENET_ROOT", "ORCH_DISABLE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def faulty_site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The `faulty` test loss (tests/fixtures/faulty-plugin) pip-installed once per session into a site folder;
    the environment that puts it on a subprocess's path. Built from a copy, so that no build files land in the
    repository and two pytest-xdist workers never build in the same folder at once."""
    base = tmp_path_factory.mktemp("faulty")
    source = base / "faulty-plugin"
    shutil.copytree(ROOT / "tests" / "fixtures" / "faulty-plugin", source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(base / "site"), str(source)], check=True, capture_output=True)
    return {"PYTHONPATH": f"{base / 'site'}:{ROOT}"}


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/experiments.db"


def _pg_available() -> bool:
    try:
        import psycopg

        psycopg.connect(PG_ADMIN.replace("postgresql://", "postgresql://", 1), connect_timeout=3).close()
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database for one test (dropped afterwards)."""
    if not _pg_available():
        if os.environ.get("ORCH_REQUIRE_POSTGRES"):
            pytest.fail(f"PostgreSQL at {PG_ADMIN} is not reachable")
        pytest.skip(f"PostgreSQL at {PG_ADMIN} is not reachable")
    import psycopg

    name = f"orch_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    yield f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/experiments.db"
    return request.getfixturevalue("pg_url")


def orch(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run the real `orch` command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if hasattr(config, "workerinput"):  # a pytest-xdist worker (addopts: -n 2 --dist loadgroup)
        _schedule_for_xdist(items)
    _skip_gpu_tests(items)


def _schedule_for_xdist(items: list[pytest.Item]) -> None:
    """Under pytest-xdist: the tests marked ``exclusive`` first, then the other end-to-end runs (``slow``), so that
    short tests fill the gaps at the end instead of one long run finishing alone; a module whose tests share a
    module- or class-scoped fixture (a trained run, a pip-installed package) in one group, so that one worker
    builds the fixture once. Every worker sorts the same collection alike, as pytest-xdist requires."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        shared = info is not None and any(defs and defs[-1].scope in ("package", "module", "class")
                                          for defs in info.name2fixturedefs.values())
        if shared:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    # stable: collection order within each class
    items.sort(key=lambda item: (item.get_closest_marker("exclusive") is None, item.get_closest_marker("slow") is None))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """Under pytest-xdist, a test marked ``exclusive`` runs alone: the other worker finishes its current test and
    waits. Two file locks shared by the session's workers: every test holds ``cpu`` shared (an exclusive test holds
    it exclusively), and passes the ``gate`` first, which an exclusive test holds while it waits and runs, so that
    the other worker's next tests cannot starve it. Covers setup (module fixtures included) and teardown."""
    workerinput = getattr(item.config, "workerinput", None)
    if workerinput is None:
        return (yield)
    import fcntl
    import tempfile

    basetemp = item.config.option.basetemp  # pytest-xdist gives each worker <the session's basetemp>/<worker id>
    stem = (Path(basetemp).parent if basetemp else Path(tempfile.gettempdir())) / f"orch-{workerinput['testrunuid']}"
    exclusive = item.get_closest_marker("exclusive") is not None
    with open(f"{stem}.gate", "a") as gate, open(f"{stem}.cpu", "a") as cpu:
        fcntl.flock(gate, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        fcntl.flock(cpu, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(gate, fcntl.LOCK_UN)
        try:
            return (yield)
        finally:
            fcntl.flock(cpu, fcntl.LOCK_UN)
            fcntl.flock(gate, fcntl.LOCK_UN)


def _skip_gpu_tests(items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` need a CUDA GPU: skipped, with the reason, on machines without one."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marked gpu)")
    for item in gpu:
        item.add_marker(skip)
