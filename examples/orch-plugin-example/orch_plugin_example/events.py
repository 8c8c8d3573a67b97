"""A tracker: each run lifecycle event as one JSON line appended to the file named by $ORCH_EXAMPLE_EVENTS.

Torch-free, like every module an entry point names (``orch plugins`` imports it). Without the variable
it does nothing. Hooks run in rank 0 of the training processes and in the worker.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from orchestrator import hookimpl

ENV = "ORCH_EXAMPLE_EVENTS"


def _append(event: str, run: Any, **fields: Any) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"event": event, "run": run.id, "attempt": run.attempt, "time": time.time(), **fields},
                      default=str)
    with open(path, "a", encoding="utf-8") as f:  # one write per line: safe across processes on POSIX
        f.write(line + "\n")


@hookimpl
def run_started(run: Any, resumed_from: int | None) -> None:
    _append("run_started", run, resumed_from=resumed_from)


@hookimpl
def metrics_logged(run: Any, step: int, metrics: dict[str, float]) -> None:
    _append("metrics_logged", run, step=step, metrics=metrics)


@hookimpl
def checkpoint_saved(run: Any, step: int, path: Path) -> None:
    _append("checkpoint_saved", run, step=step, path=str(path))


@hookimpl
def run_ended(run: Any, status: str, error: str | None) -> None:
    _append("run_ended", run, status=status, error=error)
