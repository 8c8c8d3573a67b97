"""Every rank of a run must run the same code.

Across machines nothing makes it so: a host with last week's checkout of an editable plugin, or another torch,
trains its shard of the batch with its own idea of the loss, and the run goes on without a word (or dies later
in a collective with a message about tensor sizes). So before anything is built, the ranks compare a fingerprint
of what they run (Python, torch, DeepSpeed, orch's own source and, for each component of the spec, its package's
version and the source of the module that defines it) and all refuse to start on the first difference.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import platform
import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import orchestrator
from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.spec import spec_components


def fingerprint(registry: Registry, spec: dict[str, Any]) -> dict[str, str]:
    """What this rank runs, by name: the same on every rank of a healthy run."""
    engine_source = sorted(Path(orchestrator.__file__).parent.rglob("*.py"))
    found = {
        "Python": ".".join(platform.python_version_tuple()[:2]),
        "torch": torch.__version__,
        "DeepSpeed": importlib.metadata.version("deepspeed"),
        "orch": f"{orchestrator.__version__}, source {_digest(engine_source)}",
    }
    for kind, entry in spec_components(spec):
        component = registry.components[kind].get(entry["name"])
        if component is None:  # said here, not raised: the other ranks would wait for this one's fingerprint
            found[f"{kind} {entry['name']}"] = "not installed"
            continue
        module = component.target.partition(":")[0] if isinstance(component.target, str) \
            else component.target.__module__
        package = f"{component.distribution} {component.version}"
        found[f"{kind} {entry['name']}"] = f"{package}, {module} {_source(module)}"
    return found


def check_ranks_agree(mine: dict[str, str]) -> None:
    """Raise UserError, on every rank alike, when any rank's fingerprint differs from rank 0's."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), mine))
    host0, first = everyone[0]
    for rank, (host, theirs) in enumerate(everyone):
        differ = [name for name in sorted(first.keys() | theirs.keys()) if first.get(name) != theirs.get(name)]
        if differ:
            name = differ[0]
            raise UserError(f"rank {rank} (host {host}) runs other software than rank 0 (host {host0}): {name} is "
                            f"{theirs.get(name, 'missing')} there and {first.get(name, 'missing')} on rank 0"
                            + (f" ({len(differ) - 1} more differences)" if len(differ) > 1 else "")
                            + ": install the same versions on every host (the same checkout for editable installs)")


def _source(module: str) -> str:
    """A short hash of the file that defines ``module``; "unknown" when it has none (built in, or not importable
    by name)."""
    try:
        origin = importlib.util.find_spec(module).origin
    except (ImportError, ValueError, AttributeError):
        return "unknown"
    return _digest([Path(origin)]) if origin and Path(origin).is_file() else "unknown"


def _digest(paths: list[Path]) -> str:
    """A short hash of the files' contents, in order."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return f"sha256:{h.hexdigest()[:12]}"
