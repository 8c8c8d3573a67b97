"""docker-compose.yml: valid for Compose, localhost-only ports, no credential in the file, GPUs for the worker.

Validation uses Debian's ``docker-compose`` (1.29), which checks a file without a Docker engine; CI installs it.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import installed_or_skip

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
REFERENCE = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")
SECRET_NAME = re.compile(r"PASSWORD|USER|SECRET|TOKEN|KEY|CREDENTIAL", re.I)


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_config_is_valid(tmp_path: Path) -> None:
    binary = installed_or_skip("docker-compose", "docker-compose")
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text())
    clean = {k: v for k, v in os.environ.items() if k not in _env_example()}
    base = [binary, "--project-directory", str(ROOT), "-f", str(COMPOSE), "--env-file", str(env_file)]
    check = subprocess.run([*base, "config", "-q"], capture_output=True, text=True, env=clean, timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr

    resolved = subprocess.run([*base, "config"], capture_output=True, text=True, env=clean, timeout=120)
    assert resolved.returncode == 0, resolved.stderr
    config = yaml.safe_load(resolved.stdout)
    password = _env_example()["POSTGRES_PASSWORD"]
    assert password in _environment(config["services"]["worker"])["ORCH_STORE"]  # interpolated from .env
    for name, service in config["services"].items():
        for port in service.get("ports", []):
            assert str(port.get("host_ip") if isinstance(port, dict) else port).startswith("127.0.0.1"), (name, port)

    # Without the credentials the file refuses to start, saying where to set them.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    missing = subprocess.run([binary, "--project-directory", str(ROOT), "-f", str(COMPOSE), "--env-file", str(empty),
                              "config", "-q"], capture_output=True, text=True, env=clean, timeout=120)
    assert missing.returncode != 0 and "set it in .env" in missing.stdout + missing.stderr


def test_published_ports_are_bound_to_localhost() -> None:
    services = _compose()["services"]
    published = [(name, port) for name, service in services.items() for port in service.get("ports", [])]
    assert {name for name, _ in published} == {"postgres", "mlflow"}
    for name, port in published:
        if isinstance(port, dict):  # long syntax
            assert port.get("host_ip") == "127.0.0.1", (name, port)
        else:
            assert str(port).startswith("127.0.0.1:"), (name, port)


def test_no_credential_is_written_in_the_file() -> None:
    compose = _compose()
    for name, service in compose["services"].items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                assert REFERENCE.fullmatch(value), f"{name}: {key} must be a ${{VAR}} reference, not {value!r}"
    for text in _strings(compose):
        for userinfo in re.findall(r"://([^/@\s]+)@", text):  # scheme://user:password@host
            assert REFERENCE.sub("", userinfo) in ("", ":"), f"credentials written in {text!r}"
        assert not re.search(r"(?i)(password|secret|token)\s*[=:]\s*\S", REFERENCE.sub("", text)), text
    raw = COMPOSE.read_text()
    for key, value in _env_example().items():
        if SECRET_NAME.search(key):
            assert value not in raw, f"the placeholder of {key} is written in docker-compose.yml"
        assert f"${{{key}" in raw, f".env.example lists {key}, which docker-compose.yml never uses"
    for key in REFERENCE.findall(raw):
        assert key in _env_example(), f"{key} is used in docker-compose.yml but missing from .env.example"


def test_worker_reserves_gpus_and_points_at_the_services() -> None:
    services = _compose()["services"]
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) and d.get("count") == "all"
               for d in devices), devices
    env = _environment(worker)
    assert env["ORCH_STORE"].startswith("postgresql+psycopg://") and env["ORCH_STORE"].endswith("@postgres:5432/orch")
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert any(str(v).endswith(":" + env["ORCH_RUNS_DIR"]) for v in worker["volumes"])
    command = worker["command"]
    assert (command if isinstance(command, list) else command.split()) == ["worker", "--forever"]
    assert worker["build"]["target"] == "worker"
    assert worker["stop_grace_period"] in ("60s", "1m", "1m0s")  # time to hand its run back (up to 30 s) on stop

    mlflow = services["mlflow"]
    assert _environment(mlflow)["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    args = mlflow["command"]
    for flag in ("--artifacts-destination", "--serve-artifacts", "--allowed-hosts"):
        assert flag in args, flag
    assert "*" not in str(args[args.index("--allowed-hosts") + 1]).split(",")  # never every host
    assert any(str(v).endswith(":/mlartifacts") for v in mlflow["volumes"])
    assert services["postgres"]["image"].startswith("postgres:16")
    named = set(_compose()["volumes"])
    assert {"pgdata", "mlartifacts"} <= named


def test_dockerfile_targets_and_sources_exist() -> None:
    text = DOCKERFILE.read_text()
    for service in ("mlflow", "worker"):
        assert re.search(rf"^FROM \S+ AS {service}$", text, re.M), service
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        for source in line.split()[:-1]:
            assert (ROOT / source).exists(), f"docker/Dockerfile copies {source}, which is not in the repository"
    for volume in _compose()["services"]["postgres"]["volumes"]:
        source = volume.split(":")[0]
        if source.startswith("./"):
            assert (ROOT / source).is_file(), source
