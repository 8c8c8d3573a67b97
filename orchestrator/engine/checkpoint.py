"""Checkpoint manifests: a checkpoint is trusted only if every file it lists is there, whole.

Rank 0 writes ``manifest.json`` (size and SHA-256 of every file, and the world size that saved it) after all
ranks have saved and before the store marks the checkpoint valid; a worker verifies it before resuming.

A checkpoint resumes on another number of ranks too. ZeRO-0 in fp32 keeps the whole optimizer state in one
file and loads as it is; a checkpoint whose optimizer state is partitioned across ranks (ZeRO 1-3, and
DeepSpeed's bf16 optimizer) is converted once into a universal checkpoint, ``TAG/universal``, with DeepSpeed's
``ds_to_universal`` (DeepSpeed #3810) and loaded with ``"checkpoint": {"load_universal": true}``. Light: no
torch import at module level.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
UNIVERSAL = "universal"  # the converted copy of a partitioned checkpoint, inside its folder
DISK_FULL_FREE_BYTES = 64 * 2**20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path, world_size: int | None = None) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    manifest: dict[str, Any] = {"files": entries}
    if world_size is not None:
        manifest["world_size"] = world_size
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    tmp.replace(directory / MANIFEST)


def verify(directory: Path) -> str | None:
    """None if the checkpoint is whole, else what is wrong with it."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (the checkpoint was not completely written)"
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"{manifest} is unreadable ({exc})"
    for name, expected in entries.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, expected {expected['bytes']} (truncated)"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its checksum (corrupted)"
    return None


def saved_world_size(directory: Path) -> int:
    """How many ranks saved a checkpoint: its manifest says (read before any engine exists, so no torch.load of
    the model states, where the client state has it too); older checkpoints have one ``rankN.pt`` per rank."""
    try:
        size = json.loads((directory / MANIFEST).read_text()).get("world_size")
    except (OSError, ValueError):
        size = None
    return size or len(list(directory.glob("rank*.pt"))) or 1


def is_partitioned(directory: Path) -> bool:
    """Whether the optimizer state is split across ranks (ZeRO 1-3 files ``*zero_pp_rank_*``, also written by
    DeepSpeed's bf16 optimizer at ZeRO-0): such a checkpoint loads only at the world size that saved it."""
    return any(directory.glob("*zero_pp_rank_*"))


def needs_universal(directory: Path, world_size: int) -> bool:
    return saved_world_size(directory) != world_size and is_partitioned(directory)


def universal_checkpoint(directory: Path) -> Path:
    """The universal form of a checkpoint, converted on first use into ``directory/universal`` (complete once
    its own manifest is there; a half-written one is redone) and reused by later resumes. Rank 0 only."""
    target = directory / UNIVERSAL
    if target.is_dir() and verify(target) is None:
        return target
    partial = directory / (UNIVERSAL + ".partial")
    for stale in (partial, target):
        shutil.rmtree(stale, ignore_errors=True)
    result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             str(directory), "--output_folder", str(partial), "--inject_missing_state"],
                            capture_output=True, text=True)  # the marker Megatron's client state carries: absent here
    (directory / "latest_universal").unlink(missing_ok=True)  # the converter's pointer: tags here are explicit
    if result.returncode:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise RuntimeError(f"converting {directory} to a universal checkpoint failed: "
                           f"{lines[-1] if lines else f'exit code {result.returncode}'}")
    partial.rename(target)
    write_manifest(target)
    return target


def load_rank_state(directory: Path, rank: int, world_size: int) -> dict[str, Any]:
    """This rank's RNG states and unlogged loss sums (``rankN.pt``). At another world size a new rank takes
    rank 0's RNG, and every rank the mean of the saved ranks' sums: the mean the next log would have shown."""
    import torch

    saved = saved_world_size(directory)
    if saved == world_size:
        return torch.load(directory / f"rank{rank}.pt", map_location="cpu", weights_only=False)
    states = [torch.load(directory / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in range(saved)]
    state = dict(states[rank] if rank < saved else states[0])
    state["interval"] = {k: sum(s["interval"][k] for s in states) / saved for k in states[0]["interval"]}
    return state


def is_disk_full(exc: BaseException, directory: Path) -> bool:
    """torch reports a full disk as a bare RuntimeError, so look at the errno chain and the free space."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if "No space left" in str(exc):
        return True
    try:
        return shutil.disk_usage(directory).free < DISK_FULL_FREE_BYTES
    except OSError:
        return False
