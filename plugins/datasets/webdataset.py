"""Image-caption pairs in WebDataset tar shards: the format img2dataset writes for LAION, CC3M and CC12M.

A shard is a tar file whose members are grouped by sample key (``000123.jpg``, ``000123.txt``,
``000123.cls`` ...), as the ``webdataset`` library reads and writes them. orch indexes the shards (member
offsets, and the captions, which are small) and then reads each image by seeking into its shard: the data is
map-style, so the run's sampler decides every batch, shards it across ranks without overlap, and a resumed run
continues at the exact sample; loader workers split the batches. This needs the shards on a local or shared
file system (not streamed over HTTP).

Indexing reads every member header of every shard: minutes for CC3M, and every rank of every attempt builds
the dataset. So each shard's index is kept in ``cache_dir("webdataset")`` (``~/.cache/orch/webdataset``),
keyed by the shard's path, size and modification time, and ranks that index at the same time start at
different shards (rank r of w at shard r/w of the list) and take the shards the others have cached already.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

from webdataset.tariterators import base_plus_ext

from orchestrator.data import cache_dir
from orchestrator.errors import UserError
from plugins.datasets import expand_shards
from plugins.datasets.csv import TEMPLATES
from plugins.datasets.imagefolder import load_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class Sample:
    """Where one sample's image lives: its shard, the key, and the byte range of the image member."""

    __slots__ = ("shard", "key", "offset", "size")

    def __init__(self, shard: Path, key: str, offset: int, size: int) -> None:
        self.shard, self.key, self.offset, self.size = shard, key, offset, size


INDEX_FORMAT = 1  # bump when what a cached index holds changes


def index_shard(shard: Path, caption_ext: str, label_ext: str | None) -> list[tuple[Sample, str, str | None]]:
    """(image location, caption, label text) of every complete sample in ``shard``, in tar order: from the cache
    when this shard (same path, size and modification time) was indexed before with these extensions."""
    stat = shard.stat()
    key = json.dumps([INDEX_FORMAT, str(shard), stat.st_size, stat.st_mtime_ns, caption_ext, label_ext])
    cached = cache_dir("webdataset") / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    try:
        entry = json.loads(cached.read_text())
        if entry["key"] == key:
            return [(Sample(shard, k, offset, size), text, label) for k, offset, size, text, label in entry["samples"]]
    except (OSError, ValueError, KeyError, TypeError):  # not cached yet, or unreadable: index the shard
        pass
    samples = read_index(shard, caption_ext, label_ext)
    rows = [[s.key, s.offset, s.size, text, label] for s, text, label in samples]
    _write_atomically(cached, json.dumps({"key": key, "samples": rows}))
    return samples


def _write_atomically(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (ranks indexing at once may race: the last rename wins, and each is
    complete); a cache folder that cannot be written just means no cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(temporary, path)
    except OSError:  # a full disk, say: leave no partial file behind
        Path(temporary).unlink(missing_ok=True)


def read_index(shard: Path, caption_ext: str, label_ext: str | None) -> list[tuple[Sample, str, str | None]]:
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
        samples = []
        for key, members in groups.items():
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            missing = [what for what, ok in (("image (" + "/".join(IMAGE_EXTENSIONS) + ")", image),
                                             (caption_ext, caption_ext in members),
                                             (label_ext, label_ext is None or label_ext in members)) if not ok]
            if missing:
                have = ", ".join(sorted(members))
                raise UserError(f"webdataset: sample {key} in {shard} has no {missing[0]} member (it has {have}): "
                                f"fix the shard or set caption_ext=/label_ext= to the extensions it uses")
            text = tar.extractfile(members[caption_ext]).read().decode("utf-8").strip()
            label = tar.extractfile(members[label_ext]).read().decode("utf-8").strip() if label_ext else None
            samples.append((Sample(shard, key, image.offset_data, image.size), text, label))
    return samples


class ShardSplit:
    """A split whose images are read from their shards when indexed; ``labels`` is None when unlabelled."""

    def __init__(self, samples: list[Sample], captions: list[str], labels: list[int] | None, image_size: int):
        self.samples, self.captions, self.labels, self.image_size = samples, captions, labels, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        with open(sample.shard, "rb") as f:
            f.seek(sample.offset)
            data = io.BytesIO(f.read(sample.size))
        image = load_image(data, self.image_size, "webdataset", name=f"{sample.key} in {sample.shard}")
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
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        start = len(paths) * rank // max(world, 1)  # ranks indexing at once split the work through the cache
        index = {path: index_shard(path, caption_ext, label_ext) for path in paths[start:] + paths[:start]}
        indexed = [s for path in paths for s in index[path]]
        if len(indexed) < 2:
            raise UserError(f"webdataset: {shards} holds {len(indexed)} sample(s); it needs at least 2, one to "
                            f"train on and one to hold out")
        labels = None
        if label_ext:
            self.class_names = sorted({label for _, _, label in indexed}, key=_label_order)
            self.templates = list(TEMPLATES)
            index = {name: i for i, name in enumerate(self.class_names)}
            labels = [index[label] for _, _, label in indexed]
        n = len(indexed)
        k = min(max(round(n * test_fraction), 1), n - 1)
        self.train, self.test = (
            ShardSplit([s for s, _, _ in indexed[part]], [t for _, t, _ in indexed[part]],
                       None if labels is None else labels[part], image_size)
            for part in (slice(0, n - k), slice(n - k, n))
        )


def _label_order(label: str) -> tuple[int, int | str]:
    """Numeric labels (``cls`` members hold class indices) in numeric order, others alphabetically."""
    return (0, int(label)) if label.lstrip("-").isdigit() else (1, label)

