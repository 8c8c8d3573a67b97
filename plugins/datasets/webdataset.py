"""Image-caption pairs in WebDataset tar shards: the format img2dataset writes for LAION, CC3M and CC12M.

A shard is a tar file whose members are grouped by sample key (``000123.jpg``, ``000123.txt``,
``000123.cls`` ...), as the ``webdataset`` library reads and writes them. orch indexes the shards (member
offsets, and the captions, which are small) and then reads each image by seeking into its shard: the data is
map-style, so the run's sampler decides every batch, shards it across ranks without overlap, and a resumed run
continues at the exact sample; loader workers split the batches. This needs the shards on a local or shared
file system (not streamed over HTTP).

Indexing reads every member header of every shard: minutes for CC3M, and every rank of every attempt builds
the dataset. So each shard's index is kept in ``cache_dir("webdataset")`` (``~/.cache/orch/webdataset``),
keyed by the shard's path, size and modification time, and ranks that index at the same time split the
shards (``in_rank_order``: each rank starts at a share of its own) and take the ones others have cached.
The index is held as arrays (about 36 bytes a sample over its key and caption), which forked loader workers
share without copying.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import base_plus_ext

from orchestrator.data import PackedStrings, cache_dir, in_rank_order, read_arrays, write_atomically
from orchestrator.errors import UserError
from plugins.datasets import expand_shards
from plugins.datasets.csv import TEMPLATES
from plugins.datasets.imagefolder import load_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


INDEX_FORMAT = 2  # bump when what a cached index holds changes


@dataclass
class ShardIndex:
    """Every complete sample of one shard, in tar order: its key, where its image member's bytes are, its
    caption and its label text (None without ``label_ext``). Arrays, not an object per sample (``PackedStrings``
    says why: a rank holds this for every sample, and its loader workers are forks of it)."""

    keys: PackedStrings
    offsets: np.ndarray
    sizes: np.ndarray
    captions: PackedStrings
    labels: PackedStrings | None

    def arrays(self) -> dict[str, np.ndarray]:
        """The index as named arrays, the form it is cached in."""
        out = {"offsets": self.offsets, "sizes": self.sizes}
        for name in ("keys", "captions", "labels"):
            if getattr(self, name) is not None:
                data, bounds = getattr(self, name).buffers()
                out[f"{name}_data"], out[f"{name}_bounds"] = np.frombuffer(data, dtype=np.uint8), bounds
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ShardIndex:
        def strings(name: str) -> PackedStrings | None:
            if f"{name}_data" not in arrays:
                return None
            return PackedStrings.from_buffers(arrays[f"{name}_data"], arrays[f"{name}_bounds"])

        index = cls(strings("keys"), np.asarray(arrays["offsets"], dtype=np.int64),
                    np.asarray(arrays["sizes"], dtype=np.int64), strings("captions"), strings("labels"))
        if not len(index.keys) == len(index.offsets) == len(index.sizes) == len(index.captions):
            raise ValueError("the arrays of a shard index differ in length")
        return index


def index_shard(shard: Path, caption_ext: str, label_ext: str | None) -> ShardIndex:
    """The index of ``shard``: from the cache when this shard (same path, size and modification time) was
    indexed before with these extensions, else by reading it (and then cached)."""
    stat = shard.stat()
    key = json.dumps([INDEX_FORMAT, str(shard), stat.st_size, stat.st_mtime_ns, caption_ext, label_ext])
    cached = cache_dir("webdataset") / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"
    entry = read_arrays(cached)
    if entry is not None and "key" in entry and str(entry["key"]) == key:
        try:
            return ShardIndex.from_arrays(entry)
        except (KeyError, ValueError):  # damaged: index the shard again
            pass
    index = read_index(shard, caption_ext, label_ext)
    write_atomically(cached, lambda f: np.savez(f, key=np.array(key), **index.arrays()))
    return index


def read_index(shard: Path, caption_ext: str, label_ext: str | None) -> ShardIndex:
    """Index ``shard`` by reading it: every member header, and the caption and label members."""
    try:
        tar = tarfile.open(shard)
    except (OSError, tarfile.TarError) as exc:
        raise UserError(f"webdataset: cannot read shard {shard} ({exc}): replace it or drop it from shards=") from None
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tar:
        for member in tar:
            key, ext = base_plus_ext(member.name) if member.isfile() else (None, None)
            if key is not None:
                groups.setdefault(key, {})[ext.lower()] = member
        keys, offsets, sizes, captions, labels = [], [], [], [], []
        for key, members in groups.items():
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            missing = [what for what, ok in (("image (" + "/".join(IMAGE_EXTENSIONS) + ")", image),
                                             (caption_ext, caption_ext in members),
                                             (label_ext, label_ext is None or label_ext in members)) if not ok]
            if missing:
                have = ", ".join(sorted(members))
                raise UserError(f"webdataset: sample {key} in {shard} has no {missing[0]} member (it has {have}): "
                                f"fix the shard or set caption_ext=/label_ext= to the extensions it uses")
            keys.append(key)
            offsets.append(image.offset_data)
            sizes.append(image.size)
            captions.append(tar.extractfile(members[caption_ext]).read().decode("utf-8").strip())
            if label_ext:
                labels.append(tar.extractfile(members[label_ext]).read().decode("utf-8").strip())
    return ShardIndex(PackedStrings(keys), np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64),
                      PackedStrings(captions), PackedStrings(labels) if label_ext else None)


class ShardSplit:
    """A split whose images are read from their shards when indexed; ``labels`` is None when unlabelled.
    Sample i's image is the ``sizes[i]`` bytes at ``offsets[i]`` of ``shards[shard_ids[i]]``."""

    def __init__(self, shards: list[Path], shard_ids: np.ndarray, index: ShardIndex, labels: list[int] | None,
                 image_size: int) -> None:
        self.shards, self.shard_ids, self.image_size = shards, shard_ids, image_size
        self.keys, self.offsets, self.sizes, self.captions = index.keys, index.offsets, index.sizes, index.captions
        self.labels = labels

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        shard = self.shards[self.shard_ids[i]]
        with open(shard, "rb") as f:
            f.seek(int(self.offsets[i]))
            data = io.BytesIO(f.read(int(self.sizes[i])))
        image = load_image(data, self.image_size, "webdataset", name=f"{self.keys[i]} in {shard}")
        item: dict = {"image": image, "text": self.captions[i]}
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item


class WebDataset:
    """Image-caption pairs from WebDataset tar shards (img2dataset / LAION layout); the last samples held out.

    ``shards`` is a path or brace pattern (``/data/cc3m/{00000..00331}.tar``). Each sample needs an image
    member (jpg, jpeg, png or webp) and a caption member ``caption_ext``; ``label_ext`` (e.g. ``cls``), if
    given, adds an integer ``label`` (class names in numeric order, prompted with CLIP's "a photo of a {}.")
    for label-aware samplers and evaluators. The held-out ``test`` split is the last
    ``test_fraction`` of the samples in shard order, whatever the seed. Images become RGB ``image_size``
    squares (resize, centre crop).
    """

    def __init__(self, shards: str, caption_ext: str = "txt", label_ext: str | None = None,
                 test_fraction: float = 0.01, image_size: int = 64) -> None:
        paths = expand_shards(shards)
        # ranks indexing at once split the work through the cache
        by_path = {path: index_shard(path, caption_ext, label_ext) for path in in_rank_order(paths)}
        parts = [by_path[path] for path in paths]
        n = sum(len(part.keys) for part in parts)
        if n < 2:
            raise UserError(f"webdataset: {shards} holds {n} sample(s); it needs at least 2, one to train on and "
                            f"one to hold out")
        index = ShardIndex(PackedStrings.concat(p.keys for p in parts),
                           np.concatenate([p.offsets for p in parts]), np.concatenate([p.sizes for p in parts]),
                           PackedStrings.concat(p.captions for p in parts),
                           PackedStrings.concat(p.labels for p in parts) if label_ext else None)
        shard_ids = np.repeat(np.arange(len(paths), dtype=np.int32), [len(p.keys) for p in parts])
        labels = None
        if index.labels is not None:
            self.class_names = sorted(set(index.labels), key=_label_order)
            self.templates = list(TEMPLATES)
            class_of = {name: i for i, name in enumerate(self.class_names)}
            labels = [class_of[label] for label in index.labels]
        k = min(max(round(n * test_fraction), 1), n - 1)
        self.train, self.test = (
            ShardSplit(paths, shard_ids[part], ShardIndex(index.keys[part], index.offsets[part], index.sizes[part],
                                                          index.captions[part], None),
                       None if labels is None else labels[part], image_size)
            for part in (slice(0, n - k), slice(n - k, n))
        )


def _label_order(label: str) -> tuple[int, int | str]:
    """Numeric labels (``cls`` members hold class indices) in numeric order, others alphabetically."""
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)

