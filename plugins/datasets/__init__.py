"""Built-in datasets: real handwritten digits that ship with installed packages (no download), and the
user's own images as an ImageFolder tree or a CSV of image-caption pairs.

This module is imported by ``orch plugins`` and ``orch queue``, so it stays torch-free: the checks that
need only the file system (paths exist, the tree has class folders with images, the CSV has the columns)
run here at queue time through ``resolve=``; decoding images waits for the worker.
"""

from __future__ import annotations

import csv as csv_module  # not `import csv`: the submodule plugins.datasets.csv would shadow that name
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from orchestrator import hookimpl
from orchestrator.errors import UserError

PROVIDES = {"image", "text", "label"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _check_fraction(options: dict[str, Any]) -> dict[str, Any]:
    fraction = options.get("test_fraction")
    if fraction is not None and not 0.0 < fraction < 1.0:
        raise UserError(f"--data: test_fraction={fraction} must be between 0 and 1 (exclusive), e.g. 0.2")
    return options


def _check_image_size(name: str, options: dict[str, Any]) -> None:
    if options.get("image_size", 1) < 1:
        raise UserError(f"{name}: image_size={options['image_size']} must be at least 1, e.g. 64")


def _images(folder: Path) -> Iterator[str]:
    """Image files under ``folder``, recursively, skipping hidden ones (macOS ``._x.png`` are not images).
    Paths as str from os.walk: pathlib interns every part of every path it parses, and the interpreter's table
    of interned strings keeps the size it grew to (7.3 MiB after 32,000 files, by tracemalloc)."""
    for directory, subfolders, names in os.walk(folder, followlinks=True):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        for name in names:
            path = os.path.join(directory, name)
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS \
                    and os.path.isfile(path):
                yield path


def image_files(folder: Path) -> list[str]:
    """Every image of a class folder, sorted by path components: the fixed order the held-out split depends on."""
    return sorted(_images(folder), key=lambda path: path.split(os.sep))


def class_folders(root: Path) -> list[str]:
    """The class folders of an ImageFolder tree, sorted; a one-line UserError if ``root`` is not such a tree."""
    how = "give root=/path/to/folder with one subfolder of images per class"
    if not root.exists():
        raise UserError(f"imagefolder: {root} does not exist: {how}")
    if not root.is_dir():
        raise UserError(f"imagefolder: {root} is not a folder: {how}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"imagefolder: {root} has no class subfolders: put each class's images in a folder "
                        f"named after the class ({root}/CLASS/IMAGE.png)")
    empty = [f for f in folders if next(_images(root / f), None) is None]
    if empty:
        shown = ", ".join(empty[:3]) + (f" and {len(empty) - 3} more" if len(empty) > 3 else "")
        raise UserError(f"imagefolder: class folder(s) {shown} in {root} have no images "
                        f"({', '.join(IMAGE_EXTENSIONS)}): add images or remove those folders")
    return folders


def _imagefolder(options: dict[str, Any]) -> dict[str, Any]:
    """Queue time: the tree exists and every class folder holds at least one image."""
    class_folders(Path(options["root"]))
    _check_image_size("imagefolder", options)
    return _check_fraction(options)


def csv_rows(path: Path, image_column: str, caption_column: str,
             label_column: str | None) -> list[tuple[str, str, str | None]]:
    """(image path, caption, label or None) per row; relative paths are read from the CSV's folder. Paths are
    str, not Path (``_images`` says why).

    Raises a one-line UserError for a missing or empty file, missing columns (listing those that exist),
    empty cells and image files that do not exist, so that these are found at queue time.
    """
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise UserError(f"csv: {path} {what}: give path=/path/to/pairs.csv with columns "
                        f"{image_column},{caption_column}")
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
        reader = csv_module.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise UserError(f"csv: {path} is empty: write a header line ({image_column},{caption_column}) and "
                            f"one row per image")
        wanted = [image_column, caption_column] + ([label_column] if label_column else [])
        missing = [c for c in wanted if c not in header]
        if missing:
            raise UserError(f"csv: {path} has no column(s) {', '.join(missing)}; its columns are "
                            f"{', '.join(header)}: rename them or pass image_column=, caption_column=, label_column=")
        rows, folder = [], str(path.parent.absolute())
        for line, row in enumerate(reader, start=2):
            empty = [c for c in wanted if not (row.get(c) or "").strip()]
            if empty:
                raise UserError(f"csv: line {line} of {path} has no {empty[0]}: fill it in or drop the line")
            label = row[label_column].strip() if label_column else None
            rows.append((os.path.join(folder, row[image_column].strip()), row[caption_column], label))
    if not rows:
        raise UserError(f"csv: {path} has a header but no rows: add one row per image-caption pair")
    absent = [(i, p) for i, (p, _, _) in enumerate(rows) if not os.path.isfile(p)]
    if absent:
        line, first = absent[0][0] + 2, absent[0][1]
        raise UserError(f"csv: {len(absent)} image file(s) named in {path} do not exist, e.g. {first} (line {line}): "
                        f"relative paths are read from the CSV's folder {path.parent}")
    return rows


def _csv(options: dict[str, Any]) -> dict[str, Any]:
    """Queue time: the CSV exists, has the columns, at least one row, and its image files exist."""
    csv_rows(Path(options["path"]), options["image_column"], options["caption_column"], options["label_column"])
    _check_image_size("csv", options)
    return _check_fraction(options)


def expand_shards(pattern: str) -> list[Path]:
    """The shard files of a path or brace pattern (``/data/{000..009}.tar``); a UserError unless all exist."""
    from braceexpand import braceexpand  # webdataset's own dependency; pure Python

    how = "give shards=/path/to/shard.tar or a brace pattern like /data/{00000..00099}.tar"
    try:
        paths = [Path(p).expanduser().absolute() for p in braceexpand(pattern)]
    except Exception as exc:  # noqa: BLE001 - braceexpand raises plain errors on malformed patterns
        raise UserError(f"webdataset: cannot expand shards={pattern} ({exc}): {how}") from None
    absent = [p for p in paths if not p.is_file()]
    if absent:
        more = f" and {len(absent) - 1} more" if len(absent) > 1 else ""
        raise UserError(f"webdataset: shard {absent[0]}{more} does not exist: {how}")
    return paths


def _webdataset(options: dict[str, Any]) -> dict[str, Any]:
    """Queue time: every shard exists. Its members are checked when the worker indexes the shards."""
    expand_shards(options["shards"])
    _check_image_size("webdataset", options)
    return _check_fraction(options)


def _labelled_by(option: str) -> Callable[[dict[str, Any]], set[str]]:
    """Image-text pairs, with labels when ``option`` names where they are."""
    return lambda options: {"image", "text", "label"} if options.get(option) else {"image", "text"}


@hookimpl
def register_datasets(register: Any) -> None:
    register("mnist", "plugins.datasets.mnist:MNIST", provides=PROVIDES, resolve=_check_fraction)
    register("digits", "plugins.datasets.digits:Digits", provides=PROVIDES, resolve=_check_fraction)
    register("imagefolder", "plugins.datasets.imagefolder:ImageFolder", provides=PROVIDES, resolve=_imagefolder)
    register("csv", "plugins.datasets.csv:CSVPairs", provides=_labelled_by("label_column"), resolve=_csv)
    register("webdataset", "plugins.datasets.webdataset:WebDataset", provides=_labelled_by("label_ext"),
             resolve=_webdataset)
