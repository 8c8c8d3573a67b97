"""The MLflow tracker against a real MLflow sqlite store (no mocks)."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from mlflow import MlflowClient

import plugins.trackers.mlflow as tracker_module
from orchestrator.registry import Registry
from orchestrator.runinfo import RunInfo
from plugins.trackers.mlflow import MlflowTracker

WARNING_PREFIX = "orch mlflow tracker: "


def component(name: str, **options: object) -> dict:
    return {"name": name, "options": options, "plugin": {"distribution": "orch", "version": "0.1.0"}}


def make_spec(**data_options: object) -> dict:
    loss = component("mine", temperature=0.07)
    loss["plugin"] = {"distribution": "orch-mylossplugin", "version": "1.2.3"}
    return {
        "data": component("mnist", root="/data/mnist", **data_options),
        "encoder": component("vit", depth=6, width=256, patch=[4, 4]),
        "text_encoder": component("text-transformer", depth=4),
        "loss": loss,
        "sampler": component("random"),
        "eval": [component("zs", templates=["a photo of {}"]), component("knn", k=20)],
        "trainer": {"steps": 30, "lr": 0.001, "batch_size": 64, "precision": "fp32"},
    }


def make_run(tmp_path: Path, attempt: int = 1, spec: dict | None = None) -> RunInfo:
    run_dir = tmp_path / "runs" / "7"
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = spec or make_spec()
    (run_dir / "spec.json").write_text(json.dumps(spec))
    return RunInfo(id=7, uid="0123456789abcdef", name="vit-mine-7", spec=spec, spec_hash="h" * 64,
                   attempt=attempt, run_dir=run_dir, device="cpu")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path) -> MlflowClient:
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("ORCH_EXPERIMENT", raising=False)
    monkeypatch.chdir(tmp_path)
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")


@pytest.fixture
def trackers():
    """New tracker instances (one per simulated process), their threads stopped afterwards."""
    made: list[MlflowTracker] = []

    def make() -> MlflowTracker:
        made.append(MlflowTracker())
        return made[-1]

    yield make
    for t in made:
        t.close()


def mlflow_run(client: MlflowClient, uid: str = "0123456789abcdef"):
    experiment = client.get_experiment_by_name("orch")
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`orch.run_uid` = '{uid}'")
    assert len(found) == 1
    return found[0]


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def tracker_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.getMessage().startswith(WARNING_PREFIX)]


def test_full_lifecycle_through_the_entry_point(store, tmp_path, monkeypatch, caplog):
    (ep,) = [e for e in entry_points(group="orch") if e.name == "mlflow"]
    registry = Registry.load([ep])
    assert not registry.broken
    (listed,) = registry.trackers
    assert listed.summary.startswith("MLflow tracker")
    monkeypatch.setattr(tracker_module, "_TRACKER", None)
    hook, run = registry.pm.hook, make_run(tmp_path)
    try:
        hook.run_started(run=run, resumed_from=None)
        for step in range(25):
            metrics = {"train/loss": 1.0 / (step + 1), "train/lr": 0.001}
            hook.metrics_logged(run=run, step=step, metrics=metrics)
        hook.checkpoint_saved(run=run, step=20, path=run.run_dir / "ckpt" / "20")
        hook.metrics_logged(run=run, step=24, metrics={"zs/top1": 0.5, "retrieval/recall@5": 0.25})
        (run.run_dir / "final").mkdir()
        run.weights_path.write_bytes(b"weights")
        run.eval_report_path.write_text(json.dumps({"zs/top1": 0.5}))
        hook.run_ended(run=run, status="finished", error=None)
    finally:
        if tracker_module._TRACKER is not None:
            tracker_module._TRACKER.close()

    found = mlflow_run(store)
    info, data = found.info, found.data
    assert info.status == "FINISHED" and info.run_name == "vit-mine-7"
    assert data.params["trainer.lr"] == "0.001"
    assert data.params["encoder.name"] == "vit" and data.params["encoder.depth"] == "6"
    assert data.params["encoder.patch"] == "[4, 4]"
    assert data.params["loss.temperature"] == "0.07"
    assert data.params["eval.0.name"] == "zs" and data.params["eval.1.k"] == "20"
    tags = data.tags
    assert tags["orch.spec_hash"] == "h" * 64 and tags["orch.run_id"] == "7" and tags["orch.attempt"] == "1"
    assert (tags["orch.encoder"], tags["orch.loss"], tags["orch.data"]) == ("vit", "mine", "mnist")
    assert (tags["orch.sampler"], tags["orch.eval"], tags["orch.text_encoder"]) == ("random", "zs,knn",
                                                                                     "text-transformer")
    assert tags["orch.plugin.orch"] == "0.1.0" and tags["orch.plugin.orch-mylossplugin"] == "1.2.3"
    assert tags["orch.host"] == socket.gethostname() and tags["orch.device"] == "cpu"
    assert tags["orch.last_checkpoint_step"] == "20"
    assert "orch.git_commit" not in tags  # tmp_path is no git repository
    assert steps(store, info.run_id, "train/loss") == list(range(25))
    assert steps(store, info.run_id, "zs/top1") == [24]
    assert steps(store, info.run_id, "retrieval/recall_5") == [24]  # '@' is not allowed by MLflow
    artifacts = {a.path for a in store.list_artifacts(info.run_id)}
    assert "spec.json" in artifacts
    final = {a.path for a in store.list_artifacts(info.run_id, "final")}
    assert final == {"final/weights.pt", "final/eval.json"}
    spec = json.loads(Path(store.download_artifacts(info.run_id, "spec.json", str(tmp_path))).read_text())
    assert spec == run.spec
    assert not tracker_warnings(caplog)


@pytest.mark.parametrize("same_process", [True, False])
def test_resume_logs_each_step_once(store, tmp_path, trackers, caplog, same_process):
    first = trackers()
    run1 = make_run(tmp_path, attempt=1)
    first.run_started(run1, None)
    for step in range(21):
        first.metrics_logged(run1, step, {"train/loss": float(step)})
    first.checkpoint_saved(run1, 10, run1.run_dir / "ckpt")
    first.run_ended(run1, "interrupted", None)
    assert mlflow_run(store).info.status == "KILLED"

    second = first if same_process else trackers()
    run2 = make_run(tmp_path, attempt=2)
    second.run_started(run2, 10)
    second.flush()
    resumed = mlflow_run(store)
    assert resumed.info.status == "RUNNING" and resumed.data.tags["orch.attempt"] == "2"
    for step in range(11, 31):
        second.metrics_logged(run2, step, {"train/loss": 100.0 + step, "zs/top1": 0.1})
    second.run_ended(run2, "finished", None)

    final = mlflow_run(store)
    assert final.info.status == "FINISHED"
    history = store.get_metric_history(final.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(31))
    assert {m.step: m.value for m in history}[20] == 20.0  # the first attempt's point is kept
    assert steps(store, final.info.run_id, "zs/top1") == list(range(11, 31))
    assert final.data.params["trainer.lr"] == "0.001"
    assert not tracker_warnings(caplog)


def test_default_store_experiment_and_git_commit(tmp_path, monkeypatch, trackers, empty_mlflow_db):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("ORCH_EXPERIMENT", "lit-sweep")
    monkeypatch.chdir(tmp_path)
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "c"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    tracker, run = trackers(), make_run(tmp_path)
    tracker.run_started(run, None)
    (run.run_dir / "final").mkdir()
    run.weights_path.write_bytes(b"weights")
    tracker.run_ended(run, "finished", None)

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("lit-sweep")
    assert experiment.artifact_location == (tmp_path / "mlruns").as_uri()
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    assert found.data.tags["orch.git_commit"] == found.data.tags["mlflow.source.git.commit"] == head
    weights = tmp_path / "mlruns" / found.info.run_id / "artifacts" / "final" / "weights.pt"
    assert weights.read_bytes() == b"weights"


def test_a_process_killed_while_creating_the_store_leaves_none_behind(tmp_path):
    """MLflow migrates a new SQLite store for seconds, not atomically; a process killed meanwhile (Ctrl-C in the
    first seconds of the first run) left a store that nothing could open again ("table ... already exists")."""
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    creating = subprocess.Popen([sys.executable, "-c", f"from plugins.trackers.mlflow import open_client; "
                                                       f"open_client({uri!r})"], cwd=Path(__file__).parents[3])
    deadline = time.monotonic() + 120
    while not [p for p in tmp_path.iterdir() if p.name.startswith("mlflow.db") and p.suffix != ".lock"]:
        assert creating.poll() is None and time.monotonic() < deadline, "the store was never created"
        time.sleep(0.02)
    time.sleep(0.5)  # into the migrations (several seconds)
    creating.kill()
    assert creating.wait() == -signal.SIGKILL, "the creation ended before the kill: nothing was tested"
    client = tracker_module.open_client(uri)
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlflow.db.lock"]  # the partial one is gone


def test_interrupted_from_another_process(store, tmp_path, trackers, caplog):
    trainer, run = trackers(), make_run(tmp_path)
    trainer.run_started(run, None)
    trainer.metrics_logged(run, 0, {"train/loss": 1.0})
    trainer.flush()
    assert mlflow_run(store).info.status == "RUNNING"

    # The worker that found the lease expired never called run_started: a fresh instance.
    trackers().run_ended(run, "interrupted", None)
    assert mlflow_run(store).info.status == "KILLED"
    assert not tracker_warnings(caplog)


def test_interrupted_for_a_run_mlflow_never_saw_creates_nothing(store, tmp_path, trackers, caplog):
    trackers().run_ended(make_run(tmp_path), "interrupted", None)
    experiment = store.get_experiment_by_name("orch")
    assert experiment is None or not store.search_runs([experiment.experiment_id])
    assert not tracker_warnings(caplog)


def test_failed_run_records_the_error(store, tmp_path, trackers):
    tracker, run = trackers(), make_run(tmp_path)
    tracker.run_started(run, None)
    tracker.run_ended(run, "failed", "RuntimeError: boom\n" + "x" * 10_000)
    found = mlflow_run(store)
    assert found.info.status == "FAILED"
    assert found.data.tags["orch.error"].startswith("RuntimeError: boom")
    assert len(found.data.tags["orch.error"]) == 5000


def test_secrets_are_not_params_and_masked_in_the_spec(store, tmp_path, trackers):
    spec = make_spec(api_token="tok-123", password="hunter2", hub_key="k-1")
    tracker, run = trackers(), make_run(tmp_path, spec=spec)
    tracker.run_started(run, None)
    tracker.run_ended(run, "cancelled", None)

    found = mlflow_run(store)
    assert found.info.status == "KILLED"
    params = found.data.params
    assert params["data.root"] == "/data/mnist"
    assert not {"data.api_token", "data.password", "data.hub_key"} & set(params)
    assert not {"tok-123", "hunter2", "k-1"} & set(params.values())
    text = Path(store.download_artifacts(found.info.run_id, "spec.json", str(tmp_path))).read_text()
    assert "tok-123" not in text and "hunter2" not in text and "k-1" not in text
    options = json.loads(text)["data"]["options"]
    assert options["api_token"] == options["password"] == options["hub_key"] == "***"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_never_fails_the_run(tmp_path, monkeypatch, trackers, caplog):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.chdir(tmp_path)
    tracker, run = trackers(), make_run(tmp_path)
    tracker.run_started(run, None)
    for step in range(5):
        tracker.metrics_logged(run, step, {"train/loss": 1.0})
    tracker.checkpoint_saved(run, 4, tmp_path)
    tracker.run_ended(run, "finished", None)
    trackers().run_ended(run, "interrupted", None)

    messages = tracker_warnings(caplog)
    assert messages and all(m.endswith("; training continues") and "\n" not in m for m in messages)
    assert any("end of the run" in m for m in messages)
    assert tracker.buffered == 5  # kept to retry


def test_buffered_metrics_catch_up_when_the_store_comes_back(tmp_path, monkeypatch, trackers, caplog,
                                                             empty_mlflow_db):
    blocker = tmp_path / "store"
    blocker.write_text("a file where the store's directory should be")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{blocker}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    tracker, run = trackers(), make_run(tmp_path)
    tracker.run_started(run, None)
    for step in range(10):
        tracker.metrics_logged(run, step, {"train/loss": float(step)})
    tracker.run_ended(run, "finished", None)
    assert tracker.buffered == 10 and tracker_warnings(caplog)

    blocker.unlink()
    blocker.mkdir()
    shutil.copy(empty_mlflow_db, blocker / "mlflow.db")
    tracker.flush()
    client = MlflowClient(tracking_uri=f"sqlite:///{blocker}/mlflow.db")
    found = mlflow_run(client)
    assert found.info.status == "FINISHED"  # the pending end was recorded too
    assert steps(client, found.info.run_id, "train/loss") == list(range(10))
    assert found.data.params["trainer.lr"] == "0.001"


def test_importing_the_plugin_imports_neither_mlflow_nor_torch():
    code = ("import sys, plugins.trackers.mlflow; "
            "print(sorted(m for m in ('mlflow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
