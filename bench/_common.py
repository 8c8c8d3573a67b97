"""Shared by the bench scripts: the header (device, date, command line), tables, JSON, scratch stores.

Every script starts by taking ``bench/`` off ``sys.path`` (``bench/queue.py`` would otherwise shadow the
standard library's ``queue``) and putting the repository root on it, so that ``bench._common`` imports
whether a script is run as ``python bench/X.py`` or imported by a test.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("ORCH_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    """GPU names from nvidia-smi (no torch import: some scripts time the CLI and must stay light)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def device() -> str:
    gpus = gpu_names()
    text = f"{cpu_model()} ({os.cpu_count()} logical CPUs)"
    if gpus:
        text += "; GPU: " + ", ".join(gpus)
    return text


def header(title: str) -> dict[str, Any]:
    """Print and return what identifies a measurement: device, date, command line, load."""
    info = {
        "bench": title,
        "device": device(),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"# {title}")
    for key in ("device", "date", "command", "load_average_at_start"):
        print(f"{key}: {info[key]}")
    print()
    return info


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (Markdown pipes, so it pastes into RESULTS.md)."""
    cells = [[str(h) for h in headers]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    Path(path).write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orch_command() -> list[str]:
    """How to run the CLI: the installed ``orch`` script next to this interpreter, else ``-m``."""
    script = Path(sys.executable).with_name("orch")
    if script.exists():
        return [str(script)]
    found = shutil.which("orch")
    return [found] if found else [sys.executable, "-m", "orchestrator.cli"]


@contextmanager
def postgres_database(admin_url: str = PG_ADMIN) -> Iterator[str]:
    """A new, empty PostgreSQL database (as tests/conftest.py makes them), dropped afterwards."""
    import psycopg

    name = f"orch_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0]
    try:
        yield f"postgresql+psycopg://{base.split('://', 1)[1]}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def store_url(backend: str, directory: Path, admin_url: str = PG_ADMIN) -> Iterator[str]:
    """A fresh store URL: an SQLite file in ``directory``, or a new PostgreSQL database."""
    if backend == "sqlite":
        yield f"sqlite:///{directory}/experiments.db"
    elif backend == "postgresql":
        with postgres_database(admin_url) as url:
            yield url
    else:
        raise SystemExit(f"unknown backend {backend!r}: use sqlite or postgresql")
