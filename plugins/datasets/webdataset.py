"""Image-caption pairs in WebDataset tar shards: the format img2dataset writes for LAION, CC3M and CC12M.

A shard is a tar file whose members are grouped by sample key (``000123.jpg``, ``000123.txt``,
``000123.cls`` ...), as the ``webdataset`` library reads and writes them. orch indexes the shards once
(member offsets, and the captions, which are small) and then reads each image by seeking into its shard:
the data is map-style, so the run's sampler decides every batch, shards it across ranks without overlap,
and a resumed run continues at the exact sample; loader workers split the batches. This needs the shards
on a local or shared file system (not streamed over HTTP).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from webdataset.tariterators import base_plus_ext

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


def index_shard(shard: Path, caption_ext: str, label_ext: str | None) -> list[tuple[Sample, str, str | None]]:
    """(image location, caption, label text) of every complete sample in ``shard``, in tar order."""
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
        indexed = [s for shard in expand_shards(shards) for s in index_shard(shard, caption_ext, label_ext)]
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

