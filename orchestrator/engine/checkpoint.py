"""Checkpoint manifests: a checkpoint is trusted only if every file it lists is there, whole.

Rank 0 writes ``manifest.json`` (size and SHA-256 of every file) after all ranks have saved and before
the store marks the checkpoint valid; a worker verifies it before resuming. Light: no torch import.
"""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

MANIFEST = "manifest.json"
DISK_FULL_FREE_BYTES = 64 * 2**20


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": entries}, indent=1, sort_keys=True))
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
