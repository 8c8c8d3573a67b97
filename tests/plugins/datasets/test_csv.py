"""The csv dataset: image-caption pairs from a CSV, relative paths, the last rows held out, one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.spec import resolve_component
from plugins.datasets.csv import CSVPairs
from tests.conftest import orch

CAPTIONS = ["a red square", "a green square", "a blue square, small", 'a "quoted" red square', "a green one"]
LABELS = ["red", "green", "blue", "red", "green"]


def make_csv(folder: Path, header: str = "image,caption,kind", absolute_last: bool = True) -> Path:
    """folder/pairs.csv naming images in folder/images/ (relative), the last one by its absolute path."""
    (folder / "images").mkdir(parents=True)
    lines = [header]
    for i, (text, kind) in enumerate(zip(CAPTIONS, LABELS)):
        colour = {"red": (220, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 220)}[kind]
        Image.new("RGB", (24 + i, 20), colour).save(folder / "images" / f"{i}.png")
        name = str(folder / "images" / f"{i}.png") if absolute_last and i == len(CAPTIONS) - 1 else f"images/{i}.png"
        quoted = text.replace('"', '""')
        lines.append(f'{name},"{quoted}",{kind}')
    path = folder / "pairs.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def queue_options(**raw: str) -> dict:
    """The options as `orch queue` resolves them, through the registered light `resolve=` check."""
    component = Registry.load().get("dataset", "csv")
    return resolve_component(component, raw, "data")["options"]


def one_line_error(exc: pytest.ExceptionInfo[UserError], *parts: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message


def test_pairs_split_and_items(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "data")
    data = CSVPairs(path)
    assert len(data.train) == 4 and len(data.test) == 1  # the last row is held out
    assert data.test.captions == [CAPTIONS[-1]] and data.train.captions == CAPTIONS[:-1]
    assert data.train.labels is None and not hasattr(data, "class_names")
    item = data.train[3]
    assert set(item) == {"image", "text"} and item["text"] == 'a "quoted" red square'
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["image"][0].mean() > 0.8 > 0.1 > item["image"][1].mean()  # red
    assert data.test[0]["image"][1].mean() > 0.7  # the absolute path (green) is read too


def test_options_columns_labels_size_fraction(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "data", header="file,text,kind")
    data = CSVPairs(path, image_column="file", caption_column="text", label_column="kind", image_size=8,
                    test_fraction=0.4)
    assert len(data.test) == 2 and data.class_names == ["blue", "green", "red"]
    assert data.train.labels == [2, 1, 0] and data.test.labels == [2, 1]
    assert data.train[0]["label"] == 2 and data.train[0]["image"].shape == (3, 8, 8)


def test_spreadsheet_byte_order_mark_is_not_part_of_the_first_column(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "data")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(CSVPairs(path).train) == 4


def test_queue_time_resolve_accepts_a_csv(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "data")
    assert queue_options(path=str(path), label_column="kind") == {
        "path": str(path), "image_column": "image", "caption_column": "caption", "label_column": "kind",
        "test_fraction": 0.2, "image_size": 64}


def _break(path: Path, how: str) -> dict[str, str]:
    raw = {"path": str(path)}
    if how == "missing":
        path.unlink()
    elif how == "folder":
        raw["path"] = str(path.parent)
    elif how == "empty":
        path.write_text("")
    elif how == "header only":
        path.write_text("image,caption\n")
    elif how == "columns":
        raw["caption_column"] = "text"
        raw["label_column"] = "class"
    elif how == "empty cell":
        path.write_text(path.read_text().replace('"a green square"', '"  "'))
    elif how == "missing image":
        (path.parent / "images" / "1.png").unlink()
        (path.parent / "images" / "2.png").unlink()
    return raw


@pytest.mark.parametrize("how, parts", [
    ("missing", ["does not exist", "path=/path/to/pairs.csv with columns image,caption"]),
    ("folder", ["is a folder"]),
    ("empty", ["is empty", "write a header line (image,caption)"]),
    ("header only", ["has a header but no rows"]),
    ("columns", ["has no column(s) text, class; its columns are image, caption, kind"]),
    ("empty cell", ["line 3 of", "has no caption"]),
    ("missing image", ["2 image file(s) named in", "images/1.png (line 3)", "read from the CSV's folder"]),
])
def test_errors_at_queue_time_and_build_time(tmp_path: Path, how: str, parts: list[str]) -> None:
    raw = _break(make_csv(tmp_path / "data"), how)
    with pytest.raises(UserError) as exc:
        queue_options(**raw)
    one_line_error(exc, "csv: ", *parts)
    options = {k: v for k, v in raw.items() if k != "path"}
    with pytest.raises(UserError) as exc:  # the worker says the same if the CSV changed after queueing
        CSVPairs(Path(raw["path"]), **options)
    one_line_error(exc, "csv: ", *parts)


def test_corrupt_image_is_named_at_build_time(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "data")
    bad = path.parent / "images" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    queue_options(path=str(path))  # decoding waits for the worker
    with pytest.raises(UserError) as exc:
        CSVPairs(path)
    one_line_error(exc, f"csv (line 5 of {path}): cannot read image {bad}", "replace or delete the file")


def test_images_are_checked_once_then_only_when_they_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / "cache"))
    path = make_csv(tmp_path / "data")
    CSVPairs(path)  # every image checked, and the record of the good ones kept
    assert len(list((tmp_path / "cache" / "images").glob("*.npz"))) == 1
    image = tmp_path / "data" / "images" / "1.png"
    before = image.stat()
    image.write_bytes(b"not a png, and as long as the PNG it replaced".ljust(before.st_size, b"."))
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and time: taken as checked
    CSVPairs(path)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns + 1))  # touched: checked again
    with pytest.raises(UserError) as exc:
        CSVPairs(path)
    assert str(exc.value).startswith(f"csv (line 3 of {path}): cannot read image {image} (")

    monkeypatch.setenv("ORCH_CACHE_DIR", str(path / "cache"))  # under a file: no record can be kept,
    Image.new("RGB", (4, 4)).save(image)  # so every build checks every image
    CSVPairs(path)
    fixed = image.stat()
    image.write_bytes(b"broken".ljust(fixed.st_size, b"."))
    os.utime(image, ns=(fixed.st_atime_ns, fixed.st_mtime_ns))
    with pytest.raises(UserError, match="cannot read image"):
        CSVPairs(path)


def test_a_single_row_cannot_be_split(tmp_path: Path) -> None:
    path = make_csv(tmp_path / "data")
    path.write_text("\n".join(path.read_text().splitlines()[:2]) + "\n")
    with pytest.raises(UserError) as exc:
        CSVPairs(path)
    one_line_error(exc, "has 1 row; it needs at least 2")


def test_orch_queue_checks_the_csv_and_refuses_label_evaluators(workdir: Path) -> None:
    path = make_csv(workdir / "data")
    missing = orch("queue", "--data", f"csv:path={path},caption_column=text", cwd=workdir)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "its columns are image, caption, kind" in missing.stderr
    unlabelled = orch("queue", "--data", f"csv:path={path}", cwd=workdir)  # the default --eval zs needs labels
    assert unlabelled.returncode == 2
    assert "evaluator zs needs label but dataset csv (provides image, text)" in unlabelled.stderr
    labelled = orch("queue", "--data", f"csv:path={path},label_column=kind", cwd=workdir)  # now it has labels
    assert labelled.returncode == 0, labelled.stderr
