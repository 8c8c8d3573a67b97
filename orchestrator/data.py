"""Small helpers for dataset plugins: a labelled split, captions from prompts, a fixed held-out split, the
``worker_init_fn`` of a DataLoader inside a training process, and a folder to cache what is slow to recompute.

Captions follow CLIP's prompt templates (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"): a class name inserted into a format string such as
``'a photo of the number: "{}".'``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path

import torch

from orchestrator.launch import die_with_parent


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


def loader_worker_init(worker_id: int) -> None:
    """A loader worker lives and dies with its rank: SIGTERM to every process (systemd's default, a Slurm
    preemption) must not take it from a rank that is saving its checkpoint, and a rank stopped by SIGKILL takes
    it along at once (torch's own watchdog takes 5 s). Use it for any DataLoader with workers in a rank."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)


def cache_dir(name: str) -> Path:
    """A folder for what a plugin computes once per dataset and reads back on every later attempt and rank (an
    index of tar shards, say): ``$ORCH_CACHE_DIR/NAME``, else ``$XDG_CACHE_HOME/orch/NAME``, else
    ``~/.cache/orch/NAME``. Not created here: a plugin that cannot write it should carry on without a cache."""
    root = os.environ.get("ORCH_CACHE_DIR")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orch")
    return Path(root).expanduser() / name
