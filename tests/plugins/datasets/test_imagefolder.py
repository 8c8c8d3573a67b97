"""The imagefolder dataset: labels from folder names, CLIP-style captions, a fixed split, one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.spec import resolve_component
from orchestrator.store import Store
from plugins.datasets import image_files, imagefolder
from plugins.datasets.imagefolder import TEMPLATES, ImageFolder, load_image
from tests.conftest import orch

COLOURS = {"dark_blue": (0, 0, 120), "green": (0, 200, 0), "red": (220, 0, 0)}


def make_tree(root: Path, per_class: int = 5, size: tuple[int, int] = (40, 30)) -> Path:
    """root/CLASS/img-K.png: noisy solid colours, non-square (so resizing must crop)."""
    generator = torch.Generator().manual_seed(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True)
        for k in range(per_class):
            noise = torch.randint(-20, 20, (size[1], size[0], 3), generator=generator)
            pixels = (torch.tensor(rgb) + noise).clamp(0, 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"img-{k}.png")
    return root


def queue_options(**raw: str) -> dict:
    """The options as `orch queue` resolves them, through the registered light `resolve=` check."""
    component = Registry.load().get("dataset", "imagefolder")
    return resolve_component(component, raw, "data")["options"]


def test_labels_class_names_split_and_items(tmp_path: Path) -> None:
    data = ImageFolder(make_tree(tmp_path / "tree"))
    assert data.class_names == ["dark blue", "green", "red"]  # sorted folders, underscores to spaces
    assert data.templates == TEMPLATES["photo"]
    assert len(data.train) == 12 and len(data.test) == 3  # the last image of each class is held out
    assert [Path(p).name for p in data.test.files] == ["img-4.png"] * 3
    assert data.test.labels == [0, 1, 2] and sorted(set(data.train.labels)) == [0, 1, 2]
    item = data.train[0]
    assert set(item) == {"image", "text", "label"} and item["label"] == 0
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["image"][2].mean() > 0.3 > item["image"][1].mean()  # dark blue: blue channel, no green
    assert item["text"] == "a photo of a dark blue."
    for split in (data.train, data.test):
        for i in range(len(split)):
            assert data.class_names[split.labels[i]] in split.captions[i]


def test_options_change_size_templates_and_names(tmp_path: Path) -> None:
    data = ImageFolder(make_tree(tmp_path / "tree"), image_size=16, templates="name", underscore_to_space=False,
                       test_fraction=0.4)
    assert data.class_names == ["dark_blue", "green", "red"] and data.templates == ["{}"]
    assert data.train[0]["image"].shape == (3, 16, 16) and data.train[0]["text"] == "dark_blue"
    assert len(data.test) == 6
    assert ImageFolder(tmp_path / "tree", templates="clip7").templates == TEMPLATES["clip7"]


def test_split_is_fixed_and_nested_files_count_hidden_ones_do_not(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    (root / "red" / "more").mkdir()
    Image.new("RGB", (8, 8), (200, 0, 0)).save(root / "red" / "more" / "z.png")
    (root / "red" / "._img-0.png").write_bytes(b"macOS metadata, not an image")
    (root / "red" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    a, b = ImageFolder(root), ImageFolder(root)
    assert a.test.files == b.test.files and a.train.files == b.train.files
    assert str(root / "red" / "more" / "z.png") in [*a.test.files, *a.train.files]
    assert len(a.train) + len(a.test) == 16 and a.class_names == ["dark blue", "green", "red"]


def one_line_error(exc: pytest.ExceptionInfo[UserError], *parts: str) -> None:
    message = str(exc.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message


def test_files_keep_the_order_of_their_path_components(tmp_path: Path) -> None:
    # the held-out split depends on this order; as strings "x-y.png" < "x/1.png", as components "x" < "x-y.png"
    names = ["x/1.png", "x-y.png", "x/sub/0.png", "x.png", "a b.png", "X.png", ".hidden/2.png", "x/._3.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    expected = sorted(tmp_path / n for n in names if not any(part.startswith(".") for part in Path(n).parts))
    assert image_files(tmp_path) == [str(p) for p in expected]


def test_queue_time_resolve_accepts_a_tree(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    options = queue_options(root=str(root), image_size="32")
    assert options == {"root": str(root), "test_fraction": 0.2, "image_size": 32, "templates": "photo",
                       "underscore_to_space": True}


@pytest.mark.parametrize("setup, parts", [
    ("missing", ["does not exist", "root=/path/to/folder"]),
    ("file", ["is not a folder"]),
    ("no class folders", ["has no class subfolders", "CLASS/IMAGE.png"]),
    ("empty class", ["class folder(s) empty", "have no images", ".png"]),
    ("bad fraction", ["test_fraction=1.5"]),
])
def test_queue_time_errors(tmp_path: Path, setup: str, parts: list[str]) -> None:
    root = tmp_path / "tree"
    raw = {"root": str(root)}
    if setup == "file":
        root.write_text("x")
    elif setup == "no class folders":
        root.mkdir()
        Image.new("RGB", (8, 8)).save(root / "loose.png")  # images, but not sorted into class folders
    elif setup == "empty class":
        make_tree(root)
        (root / "empty").mkdir()
        (root / "empty" / "readme.txt").write_text("no images here")
    elif setup == "bad fraction":
        make_tree(root)
        raw["test_fraction"] = "1.5"
    with pytest.raises(UserError) as exc:
        queue_options(**raw)
    one_line_error(exc, *parts)
    if setup != "bad fraction":  # the worker's build says the same if the tree changed after queueing
        with pytest.raises(UserError) as exc:
            ImageFolder(root)
        one_line_error(exc, *parts)


@pytest.mark.parametrize("content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20])
def test_corrupt_image_is_named_at_build_time(tmp_path: Path, content: bytes) -> None:
    root = make_tree(tmp_path / "tree")
    bad = root / "green" / "img-2.png"
    bad.write_bytes(content)
    queue_options(root=str(root))  # the header is not read at queue time: that needs the worker
    with pytest.raises(UserError) as exc:
        ImageFolder(root)
    one_line_error(exc, "imagefolder: cannot read image", str(bad), "replace or delete")


def test_ranks_split_the_first_check_and_skip_the_parts_others_recorded(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 of 2 checks its half of the list, then rank 0's from its end back; rank 0 then checks only what rank
    1 had not recorded; a later build checks nothing. Checks are counted through ``verify_image``; rank 1 is
    stopped where it would have reached rank 0's first file (as if rank 0 were checking it at the same time)."""
    monkeypatch.setenv("ORCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(imagefolder, "VERIFY_PART", 3)
    files = [str(f) for f in image_files(make_tree(tmp_path / "tree", per_class=4))]  # 12 files: 4 parts
    checked: list[int] = []

    class ReachedRankZerosFirstFile(Exception):
        pass

    def counting(path: str, where: str) -> None:
        if os.environ["RANK"] == "1" and path == files[0]:
            raise ReachedRankZerosFirstFile
        checked.append(files.index(path))

    monkeypatch.setattr(imagefolder, "verify_image", counting)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ReachedRankZerosFirstFile):
        imagefolder.verify_images(files, str)
    assert checked == [6, 7, 8, 9, 10, 11, 3, 4, 5]
    monkeypatch.setenv("RANK", "0")
    imagefolder.verify_images(files, str)
    assert checked[9:] == [0, 1, 2]
    imagefolder.verify_images(files, str)
    assert len(checked) == 12
    assert len(list((tmp_path / "cache" / "images").glob("*.npz"))) == 4


def test_truncated_image_is_named_when_loaded(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree", per_class=2)
    data = ImageFolder(root)
    path = Path(data.train.files[0])
    path.write_bytes(path.read_bytes()[:60])  # damaged after the dataset was built
    with pytest.raises(UserError) as exc:
        data.train[0]
    one_line_error(exc, str(path))


def test_single_image_per_class_has_nothing_to_hold_out(tmp_path: Path) -> None:
    with pytest.raises(UserError) as exc:
        ImageFolder(make_tree(tmp_path / "tree", per_class=1))
    one_line_error(exc, "single image")


def test_orch_queue_refuses_a_bad_root_in_one_line(workdir: Path) -> None:
    (workdir / "flat").mkdir()
    result = orch("queue", "--data", f"imagefolder:root={workdir / 'flat'}", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: imagefolder: {workdir / 'flat'} has no class subfolders: put each "
                                     f"class's images in a folder named after the class "
                                     f"({workdir / 'flat'}/CLASS/IMAGE.png)")
    assert not (workdir / "experiments.db").exists() or not Store.open(f"sqlite:///{workdir}/experiments.db").runs()


@pytest.mark.slow
def test_orch_run_trains_and_evaluates_zero_shot_on_a_folder(workdir: Path) -> None:
    root = make_tree(workdir / "tree", per_class=6)
    bad = make_tree(workdir / "bad", per_class=2)
    (bad / "red" / "img-1.png").write_bytes(b"garbage")
    result = orch("run", "--data", f"imagefolder:root={root},image_size=28", "--data", f"imagefolder:root={bad}",
                  "--steps", "3", "--batch-size", "8", "--quiet", cwd=workdir)
    assert result.returncode != 0, result.stdout + result.stderr  # one of the two runs failed
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    good_run, bad_run = store.run(1), store.run(2)
    assert good_run["status"] == "finished", good_run["error"]
    metrics = store.final_metrics(1)
    assert 0.0 <= metrics["zs/top1"] <= 100.0 and "train/loss" in metrics
    assert bad_run["status"] == "failed"  # a permanent failure, not retried, with the one-line reason
    assert bad_run["error"] == (f"imagefolder: cannot read image {bad / 'red' / 'img-1.png'} "
                                f"(not an image format PIL can read): replace or delete the file")
    assert len(store.attempts(2)) == 1


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields, as photos are (a bicubic upscale of a coarse random grid)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, 256, (height // 16 + 1, width // 16 + 1, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(coarse.numpy()).resize((width, height), Image.Resampling.BICUBIC)


def pillow_fit(path: Path, size: int, draft: tuple[int, int] | None = None) -> torch.Tensor:
    """The image decoded whole (or in ``draft`` mode), its centre square cut out and resized by Pillow's bicubic
    filter (``ImageOps.fit`` would also let the filter read pixels beyond the square's edges)."""
    with Image.open(path) as img:
        if draft:
            img.draft(None, draft)
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        square = img.convert("RGB").crop((left, top, left + side, top + side))
    return TF.pil_to_tensor(square.resize((size, size), Image.Resampling.BICUBIC)).float() / 255


@pytest.mark.parametrize("name,width,height", [("small.jpg", 180, 120), ("large.png", 1600, 1200)])
def test_an_image_is_decoded_whole_and_resized_as_pillow_does(tmp_path: Path, name: str, width: int,
                                                               height: int) -> None:
    """Under 4x the size (or not a JPEG) nothing is skipped: torch's uint8 bicubic resize gives Pillow's pixels."""
    path = tmp_path / name
    photo(width, height).save(path, quality=95)
    difference = (load_image(path, 48, "test") - pillow_fit(path, 48)).abs() * 255
    assert difference.max() <= 1 and difference.mean() < 0.05  # levels of 255


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_that_keeps_twice_the_size(tmp_path: Path) -> None:
    path = tmp_path / "camera.jpg"
    photo(1600, 1200).save(path, quality=95)
    with Image.open(path) as img:
        img.draft(None, (96, 96))
        assert img.size == (200, 150)  # libjpeg decodes it at 1/8 scale: at least 96 on both sides
    loaded = load_image(path, 48, "test")
    assert ((loaded - pillow_fit(path, 48, draft=(96, 96))).abs() * 255).max() <= 1  # that is what was decoded
    whole = (loaded - pillow_fit(path, 48)).abs() * 255
    assert 0 < whole.mean() < 1.5 and whole.max() <= 8  # and it is close to decoding every pixel


def test_the_centre_square_is_kept(tmp_path: Path) -> None:
    """A wide image's side margins are cut, not squeezed in: red | blue | green thirds give a blue square."""
    pixels = torch.zeros(100, 300, 3, dtype=torch.uint8)
    pixels[:, :100, 0] = pixels[:, 100:200, 2] = pixels[:, 200:, 1] = 255
    Image.fromarray(pixels.numpy()).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", 32, "test")
    assert image[2].min() > 0.95 and image[:2].max() < 0.05
