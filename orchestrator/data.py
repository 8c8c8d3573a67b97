"""Small helpers for dataset plugins: a labelled split, captions from prompts, a fixed held-out split, the
worker processes of a DataLoader inside a training process, a folder to cache what is slow to recompute (how to
write into it, and in what order ranks fill it together), and a compact sequence of strings for the captions and
paths of millions of samples.

Captions follow CLIP's prompt templates (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"): a class name inserted into a format string such as
``'a photo of the number: "{}".'``.
"""

from __future__ import annotations

import multiprocessing
import operator
import os
import signal
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch

from orchestrator.launch import die_with_parent

T = TypeVar("T")


class LabelledSplit:
    """Images (N x C x H x W floats in [0, 1]) with integer labels and, optionally, one caption each."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int], captions: Sequence[str] | None = None):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"want N x C x H x W images for {len(labels)} labels, got {tuple(images.shape)}")
        if captions is not None and len(captions) != len(labels):
            raise ValueError(f"{len(captions)} captions for {len(labels)} samples")
        self.images = images
        self.labels = [int(y) for y in labels]
        self.captions = list(captions) if captions is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i], "label": self.labels[i]}
        if self.captions is not None:
            item["text"] = self.captions[i]
        return item


def caption(label: int, index: int, class_names: Sequence[str], templates: Sequence[str]) -> str:
    """The caption of sample ``index``: its class name in template ``index % len(templates)``."""
    return templates[index % len(templates)].format(class_names[label])


def held_out(labels: Sequence[int], test_fraction: float) -> tuple[list[int], list[int]]:
    """A fixed, stratified held-out split: the LAST ``round(n_c * test_fraction)`` samples of each class.

    It depends only on the order of the data (never on a seed), so every run evaluates on the same
    samples. Each class keeps at least one sample on each side. Returns (train indices, test indices).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    train, test = [], []
    for indices in by_class.values():
        k = min(max(round(len(indices) * test_fraction), 1), len(indices) - 1)
        train += indices[: len(indices) - k]
        test += indices[len(indices) - k:]
    return sorted(train), sorted(test)


def labelled_splits(images: torch.Tensor, labels: Sequence[int], class_names: Sequence[str],
                    templates: Sequence[str], test_fraction: float) -> tuple[LabelledSplit, LabelledSplit]:
    """Train and held-out test splits (see ``held_out``), each sample captioned by ``caption``."""
    splits = []
    for indices in held_out(labels, test_fraction):
        ys = [int(labels[i]) for i in indices]
        captions = [caption(y, i, class_names, templates) for i, y in zip(indices, ys, strict=True)]
        splits.append(LabelledSplit(images[indices], ys, captions))
    return splits[0], splits[1]


def loader_workers(workers: int) -> dict[str, Any]:
    """The DataLoader arguments for ``workers`` loader processes inside a rank (none for 0): ``**loader_workers(n)``.

    They are forked, whatever the default start method: Python 3.14 makes it forkserver on Linux (spawn on macOS
    since 3.8), and a worker started so is sent the dataset and the collate function pickled (orch's holds the
    model, whose DeepSpeed hooks do not pickle: the run crashed), copies what a forked one shares with its rank
    (a dataset's index of millions of samples), and has the fork server, not its rank, for parent. Forked, as
    every loader on Linux was before 3.14, each lives and dies with its rank (``loader_worker_init``)."""
    if workers == 0:
        return {"num_workers": 0}
    fork = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    return {"num_workers": workers, "multiprocessing_context": fork, "worker_init_fn": loader_worker_init}


def loader_worker_init(worker_id: int) -> None:
    """A loader worker lives and dies with its rank (``loader_workers`` sets it).

    - It stops on its rank's SIGTERM, as torch's own worker does: that is how torch's shutdown, and multiprocessing
      at the rank's exit, stop it. (Ignoring that one too left a rank that exits with its loader alive, after a
      crash say, waiting for the worker forever.)
    - It outlives anyone else's SIGTERM: systemd's default and a Slurm preemption signal every process, and the
      rank may be saving its checkpoint. Telling the two apart needs the sender (``sigwaitinfo``, as torch's C
      handler reads ``si_pid``); without it (macOS) torch's handler stays, and the worker stops on either.
    - A rank stopped by SIGKILL takes it along at once (torch's own watchdog takes 5 s).
    """
    die_with_parent(signal.SIGKILL)
    if hasattr(signal, "sigwaitinfo"):
        # blocked before any other thread starts (threads inherit it): only the waiting thread takes SIGTERM
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        threading.Thread(target=_exit_on_sigterm_from, args=(os.getppid(),), daemon=True,
                         name="orch-sigterm").start()


def _exit_on_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)  # as torch's handler: a non-zero code would make the rank report the worker as failed


def cache_dir(name: str) -> Path:
    """A folder for what a plugin computes once per dataset and reads back on every later attempt and rank (an
    index of tar shards, say): ``$ORCH_CACHE_DIR/NAME``, else ``$XDG_CACHE_HOME/orch/NAME``, else
    ``~/.cache/orch/NAME``. Not created here: a plugin that cannot write it should carry on without a cache."""
    root = os.environ.get("ORCH_CACHE_DIR")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orch")
    return Path(root).expanduser() / name


def in_rank_order(items: Sequence[T]) -> list[T]:
    """``items`` in the order this rank should work through them when the ranks that build a dataset at once share
    the work through ``cache_dir`` (each item's result cached, and skipped by a rank that finds it there).

    The items are cut into one share per rank. A rank takes its own share first, then the others' shares, each
    backwards, starting from the one before its own: forwards, a rank done with its share would follow the next
    rank through that rank's share, doing each item at the same time; backwards it meets that rank halfway.
    On one machine, rank r of w owns the share from r/w to (r+1)/w. On M machines of L ranks, the list is cut
    into L blocks and each block into M shares: local rank l of machine m owns share m of block l, and takes the
    rest of block l before the other blocks. So each machine's ranks split the whole list between them (what a
    machine with a cache folder of its own must check), and with one folder shared by all, every rank still
    checks only its own share and meets the ranks whose shares it walks halfway. Machines of unequal size order
    as one machine."""
    rank, world = int(os.environ.get("RANK", "0")), max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    # ranks a machine and machines: torchrun sets LOCAL_WORLD_SIZE and GROUP_WORLD_SIZE, DeepSpeed's launcher
    # LOCAL_SIZE and CROSS_SIZE; with unequal machines (a hostfile's slots differ) every rank orders as on one
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or world)
    machines = int(os.environ.get("GROUP_WORLD_SIZE") or os.environ.get("CROSS_SIZE") or world // max(local, 1))
    machines = machines if machines > 1 and machines * local == world else 1
    own = rank % local * machines + rank // local if machines > 1 else rank
    shares = [items[len(items) * s // world:len(items) * (s + 1) // world] for s in range(world)]
    others = sorted((s for s in range(world) if s != own),
                    key=lambda s: (s // machines != own // machines, (own - s) % world))
    return [*shares[own], *(item for s in others for item in reversed(shares[s]))]


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` (a file in ``cache_dir``) by calling ``write`` on a binary file: whole or not at all. Ranks
    writing at once may race: the last rename wins, and each is complete. A folder that cannot be written means
    no cache: nothing is written and nothing raised."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(temporary, path)
    except OSError:  # a full disk, say: leave no partial file behind
        Path(temporary).unlink(missing_ok=True)


def read_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of an ``.npz`` file (written with ``write_atomically`` and ``np.savez``), or None when it is
    absent or unreadable: a cache entry to compute again. Pickled objects are refused, not loaded."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return dict(arrays)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


class PackedStrings(Sequence[str]):
    """Strings packed into one UTF-8 buffer, with an array of where each ends: for the captions, keys and file
    paths of a dataset of millions of samples.

    As a list, each string is a Python object (about 50 bytes over its characters), and reading one writes its
    reference count. A DataLoader worker is a fork of its rank: every page it writes is copied, so over an epoch
    each worker copies the whole index, and a garbage collection in a worker copies it at once. Packed, a string
    costs its UTF-8 bytes plus 8, and reading one writes nothing that the worker shares (bench/loader.py).
    A slice shares the buffer; pickling (a spawned worker) sends only the slice's own bytes.
    """

    def __init__(self, strings: Iterable[str] = ()) -> None:
        encoded = [s.encode() for s in strings]
        bounds = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=bounds[1:])
        self._data, self._bounds = b"".join(encoded), bounds

    @classmethod
    def from_buffers(cls, data: bytes | np.ndarray, bounds: np.ndarray) -> PackedStrings:
        """The inverse of ``buffers``: UTF-8 bytes and the n + 1 offsets that delimit n strings in them."""
        bounds = np.asarray(bounds, dtype=np.int64)
        data = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        if bounds.ndim != 1 or len(bounds) < 1 or bounds[0] != 0 or bounds[-1] != len(data) \
                or np.any(np.diff(bounds) < 0):
            raise ValueError(f"bounds must rise from 0 to {len(data)} (the data's length)")
        packed = cls.__new__(cls)
        packed._data, packed._bounds = data, bounds
        return packed

    @classmethod
    def concat(cls, parts: Iterable[PackedStrings]) -> PackedStrings:
        """One sequence of the strings of ``parts``, in order."""
        buffers = [part.buffers() for part in parts]
        starts = np.cumsum([0] + [len(data) for data, _ in buffers])[:-1]
        bounds = np.concatenate([np.zeros(1, dtype=np.int64)]
                                + [b[1:] + start for (_, b), start in zip(buffers, starts, strict=True)])
        return cls.from_buffers(b"".join(data for data, _ in buffers), bounds)

    def buffers(self) -> tuple[bytes, np.ndarray]:
        """This sequence's own UTF-8 bytes and the offsets (from 0) that delimit its strings."""
        start = int(self._bounds[0])
        return self._data[start:int(self._bounds[-1])], self._bounds - start

    def __len__(self) -> int:
        return len(self._bounds) - 1

    def __getitem__(self, i: int | slice) -> str | PackedStrings:  # as a list: a str, or a slice's sequence
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return PackedStrings(self[j] for j in range(start, stop, step))
            view = PackedStrings.__new__(PackedStrings)
            view._data, view._bounds = self._data, self._bounds[start:max(start, stop) + 1]
            return view
        i = operator.index(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} strings")
        return self._data[int(self._bounds[i]):int(self._bounds[i + 1])].decode()

    def __iter__(self) -> Iterator[str]:
        data, bounds = self._data, self._bounds.tolist()
        return (data[a:b].decode() for a, b in zip(bounds, bounds[1:], strict=False))

    def __eq__(self, other: object) -> bool:  # equal to a list or tuple of the same strings, as a list is
        if not isinstance(other, PackedStrings | list | tuple):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # mutable-looking and compared by value, like a list

    def __reduce__(self) -> tuple:
        return PackedStrings.from_buffers, self.buffers()

    def __repr__(self) -> str:
        return f"PackedStrings({len(self)} strings, {len(self._data)} bytes)"
