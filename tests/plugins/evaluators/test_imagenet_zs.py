"""imagenet-zs: CLIP's ImageNet zero-shot protocol on a tiny ImageFolder tree, and its queue-time checks."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from orchestrator.engine.evaluation import EvalContext
from orchestrator.errors import UserError
from orchestrator.registry import Registry
from orchestrator.spec import resolve_component
from plugins.evaluators import IMAGENET_ENV, _imagenet_root, imagenet_metadata
from plugins.evaluators.imagenet_zs import ImageNetZeroShot

META = imagenet_metadata()
PICKED = [0, 1, 207, 999]  # tench, goldfish, Golden Retriever, toilet paper: names that occur once
STEP = 80  # the picked class at position k is drawn with red = k * STEP
DIM = 128
CODES = F.normalize(torch.randn(1000, DIM, generator=torch.Generator().manual_seed(0)), dim=-1)  # per class


class ColourImage(nn.Module):
    """The code of the class whose colour the image has; records the input sizes it sees."""

    image_size = 16
    embed_dim = DIM

    def __init__(self):
        super().__init__()
        self.transform = nn.Identity()
        self.sizes = set()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.sizes.add(tuple(images.shape[1:]))
        position = (images[:, 0].mean(dim=(1, 2)) * 255 / STEP).round().long()
        return CODES[torch.tensor(PICKED)[position]]


class NameText(nn.Module):
    """The code of (the class whose name is in the caption + shift) mod 1000."""

    embed_dim = DIM
    index = {t.format(n): i for i, n in reversed(list(enumerate(META["names"]))) for t in META["templates"]}

    def __init__(self, shift: int = 0):
        super().__init__()
        self.shift = shift

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.index[t] for t in texts])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return CODES[(tokens + self.shift) % 1000]


@pytest.fixture
def val(tmp_path):
    root = tmp_path / "val"
    for k, c in enumerate(PICKED):
        folder = root / META["wnids"][c]
        folder.mkdir(parents=True)
        colour = (k * STEP, 30, 200)
        Image.new("RGB", (40, 30), colour).save(folder / "a.png")
        Image.new("RGB", (24, 50), colour).save(folder / "b.PNG")
        Image.new("RGB", (33, 33), colour).save(folder / "c.JPEG", quality=100)
    Image.new("L", (20, 20), 0).save(root / META["wnids"][0] / "d.png")  # greyscale: converted to RGB
    (root / META["wnids"][0] / "notes.txt").write_text("not an image")
    (root / "LOC_val_solution.csv").write_text("files at the top are ignored")
    return root


def ctx(text=None, image=None) -> EvalContext:
    image = ColourImage() if image is None else image
    text = NameText() if text is None else text
    return EvalContext(image, text, None, torch.device("cpu"), batch_size=4096)


def test_metadata_has_clip_names_templates_and_sorted_wnids():
    assert len(META["names"]) == 1000 and len(META["templates"]) == 80
    assert len(META["wnids"]) == len(set(META["wnids"])) == 1000 and META["wnids"] == sorted(META["wnids"])
    assert all(t.count("{}") == 1 for t in META["templates"])
    assert (META["wnids"][0], META["names"][0]) == ("n01440764", "tench")
    assert (META["wnids"][207], META["names"][207]) == ("n02099601", "Golden Retriever")
    assert (META["wnids"][999], META["names"][999]) == ("n15075141", "toilet paper")
    assert {"names", "templates", "wnids"} <= set(META["source"])
    assert "Prompt_Engineering_for_ImageNet" in META["source"]["names"]


def test_perfect_encoders_score_100_against_all_1000_classes(val):
    image = ColourImage()
    evaluator = ImageNetZeroShot(root=val, batch_size=4, workers=0)
    assert evaluator.evaluate(ctx(image=image)) == {"top1": 100.0, "top5": 100.0}
    assert image.sizes == {(3, 16, 16)}  # RGB, resized and centre-cropped to the encoder's image_size
    protocol = evaluator.protocol()
    assert protocol["samples"] == 13 and protocol["candidates"] == 1000 and protocol["templates"] == 80


def test_wrong_text_tower_scores_0(val):
    metrics = ImageNetZeroShot(root=val, workers=0).evaluate(ctx(text=NameText(shift=1)))
    assert metrics["top1"] == 0.0


def test_present_classes_and_max_per_class(val):
    evaluator = ImageNetZeroShot(root=val, max_per_class=1, classes="present", workers=2)
    assert evaluator.evaluate(ctx()) == {"top1": 100.0}  # 4 candidates: no top5
    assert evaluator.protocol()["samples"] == 4 and evaluator.protocol()["candidates"] == 4


def test_root_from_the_environment(val, monkeypatch):
    monkeypatch.setenv(IMAGENET_ENV, str(val))
    assert _imagenet_root({"root": None, "batch_size": 8}) == {"root": str(val), "batch_size": 8}
    assert ImageNetZeroShot(workers=0).evaluate(ctx())["top1"] == 100.0


def test_relative_root_is_stored_absolute(val, monkeypatch):
    monkeypatch.chdir(val.parent)
    assert _imagenet_root({"root": "val"})["root"] == str(val)


def one_line_error(options) -> str:
    with pytest.raises(UserError) as info:
        _imagenet_root(options)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_root_says_how_to_give_it(monkeypatch):
    monkeypatch.delenv(IMAGENET_ENV, raising=False)
    message = one_line_error({"root": None})
    assert IMAGENET_ENV in message and "--eval imagenet-zs:root=" in message


def test_nonexistent_or_empty_root(tmp_path, monkeypatch):
    assert "is not a folder" in one_line_error({"root": str(tmp_path / "nowhere")})
    monkeypatch.setenv(IMAGENET_ENV, str(tmp_path / "also-nowhere"))
    assert "also-nowhere" in one_line_error({"root": None})
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "ILSVRC2012_val_00000001.JPEG")
    assert "no class subfolders" in one_line_error({"root": str(tmp_path / "flat")})


def test_unknown_folder_is_a_clear_error(val):
    (val / "cats").mkdir()
    assert "cats" in one_line_error({"root": str(val)})
    with pytest.raises(UserError, match="not ImageNet-1k WordNet ids"):
        ImageNetZeroShot(root=val, workers=0).evaluate(ctx())


def test_resolved_through_the_registry(val, monkeypatch):
    monkeypatch.delenv(IMAGENET_ENV, raising=False)
    component = Registry.load().get("evaluator", "imagenet-zs")
    resolved = resolve_component(component, {"root": str(val), "max_per_class": "2"}, "eval")
    assert resolved["options"]["root"] == str(val) and resolved["options"]["max_per_class"] == 2
    with pytest.raises(UserError, match=IMAGENET_ENV):
        resolve_component(component, {}, "eval")
