"""Your own labelled images, as an ImageFolder tree (``root/CLASS/IMAGE.png``), with CLIP-style captions.

Labels are the sorted class folder names; captions put the class name into prompt templates as CLIP did
(Radford et al. 2021), so the same names and templates also drive zero-shot evaluation (``--eval zs``).
Images are decoded when indexed, not held in memory, so a large folder costs only its file list; every
file is checked when the dataset is first built so that a corrupt image fails the run at the start, with
its name, instead of hours into training (later builds check only the files that changed: ``verify_images``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

from orchestrator.data import PackedStrings, cache_dir, caption, held_out, in_rank_order, read_arrays, write_atomically
from orchestrator.errors import UserError
from plugins.datasets import class_folders, image_files

# Prompt sets. "photo": five of CLIP's 80 ImageNet templates, short enough that a byte-level text tower
# with a 32-token context keeps class names of up to 8 characters whole. "clip7": the 7 templates CLIP's
# Prompt_Engineering_for_ImageNet notebook selected. "name": the bare class name.
TEMPLATES = {
    "photo": ["a photo of a {}.", "a blurry photo of a {}.", "a cropped photo of a {}.",
              "a bright photo of a {}.", "a photo of the {}."],
    "clip7": ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
              "a {} in a video game.", "art of the {}.", "a photo of the small {}."],
    "name": ["{}"],
}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL can read"
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def verify_image(path: str | Path, where: str) -> None:
    """Read the file's header and checksums (no full decode), or raise a UserError that names the file."""
    try:
        with Image.open(path) as img:
            img.verify()
    except _DECODE_ERRORS as exc:
        raise UserError(f"{where}: cannot read image {path} ({_reason(exc)}): replace or delete the file") from None


VERIFIED_FORMAT = 2  # bump when what a record of verified files holds changes
VERIFY_PART = 4096  # files a rank checks, then records, before it moves on to the next part of the list


def verify_images(files: Sequence[str], where: Callable[[int], str]) -> None:
    """``verify_image`` for every file (``where(i)`` names file i's place in an error), once: the list is checked
    in parts of ``VERIFY_PART`` files, and each part's files found fine are recorded, with their sizes and
    modification times, in ``cache_dir("images")`` under the list of files, so the builds that follow (every
    rank, every attempt) check only the files that changed. Checking costs about 50 us a file (Pillow parses
    the headers in Python: CC3M's 3.3 M files take minutes), so ranks that check at once split the parts
    (``in_rank_order``). Reading the sizes and times back costs a stat."""
    sizes, mtimes = np.empty(len(files), dtype=np.int64), np.empty(len(files), dtype=np.int64)
    for i, path in enumerate(files):
        try:
            stat = os.stat(path)
        except OSError as exc:
            raise UserError(f"{where(i)}: cannot read image {path} ({exc.strerror}): replace or delete the "
                            f"file") from None
        sizes[i], mtimes[i] = stat.st_size, stat.st_mtime_ns
    data, bounds = PackedStrings(files).buffers()
    digest = hashlib.sha256(f"{VERIFIED_FORMAT}\0".encode() + bounds.tobytes() + data).hexdigest()[:32]
    for start in in_rank_order(range(0, len(files), VERIFY_PART)):
        part = slice(start, start + VERIFY_PART)
        record = cache_dir("images") / f"{digest}-{start}.npz"
        seen = read_arrays(record) or {}  # none yet, or unreadable: every file of the part is checked
        unchanged = np.zeros(len(sizes[part]), dtype=bool)
        if seen.keys() >= {"sizes", "mtimes"} and seen["sizes"].shape == seen["mtimes"].shape == unchanged.shape:
            unchanged = (seen["sizes"] == sizes[part]) & (seen["mtimes"] == mtimes[part])
        if unchanged.all():
            continue
        for i in start + np.flatnonzero(~unchanged):
            verify_image(files[i], where(i))
        write_atomically(record, partial(np.savez, sizes=sizes[part], mtimes=mtimes[part]))


def load_image(path: str | Path | BinaryIO, size: int, where: str, name: str | None = None) -> torch.Tensor:
    """3 x size x size RGB floats in [0, 1]: the centre square, bicubic-resized (antialiased) to ``size``.
    ``path`` may be an open binary file (a tar member), then ``name`` says which image it is.

    Speed matters here: every training sample passes through it in a loader worker (bench/loader.py). The
    resize runs on uint8 pixels in torch (4-9x faster than Pillow's, the same pixels to within a level), and
    a JPEG at least 4x ``size`` on both sides is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling)
    while twice ``size`` remains for the resize, as Pillow's ``thumbnail`` does."""
    try:
        with Image.open(path) as img:
            img.draft(None, (2 * size, 2 * size))  # only JPEGs have a draft mode; others ignore it
            img = img.convert("RGB")
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            square = TF.pil_to_tensor(img.crop((left, top, left + side, top + side)))
    except _DECODE_ERRORS as exc:
        raise UserError(f"{where}: cannot read image {name or path} ({_reason(exc)}): replace or delete "
                        f"the file") from None
    resized = TF.resize(square, [size, size], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    return resized.float().div_(255.0)


class ImageFiles:
    """A split whose images are decoded from their files when indexed; ``labels`` is None when unlabelled.
    Paths and captions are packed (``PackedStrings``): a CSV of millions of rows held as Path objects costs
    hundreds of bytes a row, and every loader worker would copy them."""

    def __init__(self, files: Sequence[str | Path], captions: Sequence[str], labels: Sequence[int] | None,
                 image_size: int, where: str) -> None:
        self.files, self.captions = PackedStrings(str(f) for f in files), PackedStrings(captions)
        self.labels = None if labels is None else [int(y) for y in labels]
        self.image_size, self.where = image_size, where

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        item = {"image": load_image(self.files[i], self.image_size, self.where), "text": self.captions[i]}
        if self.labels is not None:
            item["label"] = self.labels[i]
        return item


class ImageFolder:
    """Your labelled images in an ImageFolder tree (root/CLASS/IMAGE.png), CLIP-style captions; fixed split.

    ``root`` holds one folder per class (nested folders inside a class are included); labels follow
    the sorted folder names, which ``underscore_to_space`` turns into class names (``golden_retriever``
    -> ``golden retriever``). Each image's caption is its class name in one of the ``templates``
    (photo: CLIP-style "a photo of a {}.", clip7: CLIP's 7 ImageNet prompts, name: the bare name), which
    zero-shot evaluation uses too. The held-out ``test`` split is the last ``test_fraction`` of each class
    in file-name order, whatever the seed. Images become RGB ``image_size`` squares (resize, centre crop).
    """

    def __init__(self, root: Path, test_fraction: float = 0.2, image_size: int = 64,
                 templates: Literal["photo", "clip7", "name"] = "photo", underscore_to_space: bool = True):
        root = Path(root)
        folders = class_folders(root)
        self.class_names = [f.replace("_", " ") if underscore_to_space else f for f in folders]
        self.templates = list(TEMPLATES[templates])
        files, labels = [], []
        for label, folder in enumerate(folders):
            found = image_files(root / folder)
            files += found
            labels += [label] * len(found)
        verify_images(files, lambda i: "imagefolder")
        captions = [caption(y, i, self.class_names, self.templates) for i, y in enumerate(labels)]
        train, test = held_out(labels, test_fraction)
        if not test:
            raise UserError(f"imagefolder: every class folder in {root} holds a single image; the held-out split "
                            f"needs at least 2 images in some class")
        self.train, self.test = (
            ImageFiles([files[i] for i in idx], [captions[i] for i in idx], [labels[i] for i in idx],
                       image_size, "imagefolder")
            for idx in (train, test)
        )
