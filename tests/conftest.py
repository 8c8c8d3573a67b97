"""Shared fixtures: a scratch working directory, real SQLite and PostgreSQL stores, the CLI in a subprocess."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

PG_ADMIN = os.environ.get("ORCH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist (pyproject's addopts) each worker runs its own training processes: one OpenMP thread each,
    # set before anything imports torch and inherited by every process a test starts. Two runs with a thread per
    # core each ran more than 3x slower than one after the other (their threads contend at every op).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow database, made by MLflow once per session: a new one costs every run that
    creates it seconds of schema migrations."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True, scope="session")
def plugin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Plugins' caches (the webdataset plugin's shard indexes, the record of checked images) go to a folder of
    this session, not ~/.cache; the subprocesses the tests start inherit it."""
    path = tmp_path_factory.mktemp("orch-cache")
    os.environ["ORCH_CACHE_DIR"] = str(path)
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path) -> Path:
    """A fresh working directory with its own default store and runs folder, and a copy of the empty MLflow
    store (delete ``mlflow.db`` to test its creation)."""
    monkeypatch.chdir(tmp_path)
    for var in ("ORCH_STORE", "ORCH_RUNS_DIR", "MLFLOW_TRACKING_URI", "ORCH_IMAGENET_ROOT", "ORCH_DISABLE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    return tmp_path


@pytest.fixture(scope="session")
def faulty_site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The `faulty` test loss (tests/fixtures/faulty-plugin) pip-installed once per session into a site folder;
    the environment that puts it on a subprocess's path."""
    target = tmp_path_factory.mktemp("faulty") / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT / "tests" / "fixtures" / "faulty-plugin")],
                   check=True, capture_output=True)
    return {"PYTHONPATH": f"{target}:{ROOT}"}


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def install_module_plugin(site: Path, distribution: str, version: str, source: str) -> dict[str, str]:
    """A one-module plugin installed into ``site`` as pip would (a dist-info folder on the path): the module
    ``distribution`` with dashes as underscores, holding ``source``, under the entry point of that name. Returns
    the environment that puts ``site`` on the path of orch's processes."""
    module = distribution.replace("-", "_")
    dist = site / f"{module}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text(f"[orch]\n{module} = {module}\n")
    (site / f"{module}.py").write_text(source)
    return {"PYTHONPATH": f"{site}:{ROOT}"}


def installed_or_skip(name: str, packages: str) -> str:
    """The path of a system tool a test needs; skipped without it, failed in CI (``.ci/run`` installs it)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail(f"{name} is missing in CI: .ci/run installs it (apt-get install {packages})")
    pytest.skip(f"{name} is not installed (apt-get install -y --no-install-recommends {packages}); CI installs it")


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def imagenet_folder(root: Path) -> Path:
    """An ImageNet validation folder: the first 3 WordNet ids of imagenet-zs's metadata, 3 random JPEGs each."""
    from orchestrator.testing import image_folder
    from plugins.evaluators import imagenet_metadata

    return image_folder(root, imagenet_metadata()["wnids"][:3])


class AliveImages:
    """A split whose images are counted while alive: each read makes a new tensor, as a decoding dataset's does,
    so ``most_alive`` says how many decoded images a reader held at once."""

    def __init__(self, split: Any) -> None:
        self.split, self.alive, self.most_alive = split, 0, 0
        self.labels, self.captions = getattr(split, "labels", None), getattr(split, "captions", None)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.split[i])
        item["image"] = item["image"].clone()
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(item["image"], self._dropped)
        return item

    def _dropped(self) -> None:
        self.alive -= 1


def training_processes(run_dir: Path) -> list[psutil.Process]:
    """The processes here whose command line carries one run's training: its ranks, whoever started them, and the
    launchers, pdsh and ssh between them and the worker."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "orchestrator.engine.train" in cmd and str(run_dir) in cmd:
            found.append(proc)
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
