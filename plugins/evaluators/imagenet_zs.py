"""Zero-shot ImageNet classification as in CLIP (Radford et al. 2021): 1000 class names, 80 prompts.

The class names and prompt templates are OpenAI's (CLIP's Prompt_Engineering_for_ImageNet notebook, as
listed in open_clip's zero_shot_metadata.py); see ``imagenet_zeroshot.json`` for their sources. Images
are read from a validation folder in ImageFolder layout (one folder per WordNet id), resized (short side)
and centre-cropped to the image encoder's ``image_size`` (224 if it has none), then passed through the
encoder's own ``transform`` by ``ctx.encode_images``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from orchestrator.data import loader_workers
from orchestrator.engine.evaluation import EvalContext
from orchestrator.errors import UserError
from plugins.evaluators import _imagenet_root, imagenet_class_folders, imagenet_metadata
from plugins.evaluators.zs import ENSEMBLE, LOGIT_SCALE, topk_accuracy, zero_shot_classifier

PREPROCESS = "RGB, bicubic resize of the short side, centre crop to the encoder's image_size"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class _ImageFiles(Dataset):
    def __init__(self, samples: list[tuple[Path, int]], size: int):
        self.samples = samples
        resize = v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        self.prepare = v2.Compose([resize, v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        with Image.open(path) as img:
            pixels = TF.pil_to_tensor(img.convert("RGB"))
        return self.prepare(pixels).float().div_(255.0), label


class ImageNetZeroShot:
    """Zero-shot top-1/top-5 accuracy on an ImageNet validation folder with CLIP's 1000 names and 80 prompts.

    ``root`` is the validation folder in ImageFolder layout (default: ``$ORCH_IMAGENET_ROOT``).
    ``max_per_class`` > 0 keeps the first N images of each class (sorted by file name) for a quick look.
    ``classes=all`` scores every image against all 1000 classes (the standard protocol); ``present``
    only against the classes whose folders exist (for ImageNet subsets such as Imagenette).
    ``batch_size`` images are decoded at a time by ``workers`` loader processes.
    """

    def __init__(self, root: Path | None = None, batch_size: int = 256, max_per_class: int = 0,
                 workers: int = 4, classes: Literal["all", "present"] = "all"):
        self.root = root
        self.batch_size = batch_size
        self.max_per_class = max_per_class
        self.workers = workers
        self.classes = classes
        self._seen: dict[str, Any] = {}

    def protocol(self) -> dict[str, Any]:
        """How the numbers were obtained (sample and class counts once ``evaluate`` has run)."""
        return {"evaluator": "ImageNet zero-shot classification (Radford et al. 2021)",
                "classes": self.classes, "templates": len(imagenet_metadata()["templates"]),
                "ensemble": ENSEMBLE, "logit_scale": LOGIT_SCALE, "max_per_class": self.max_per_class,
                "preprocess": PREPROCESS,
                **self._seen}

    def _samples(self, root: Path, folders: list[str], position: dict[str, int]) -> list[tuple[Path, int]]:
        samples = []
        for folder in folders:
            files = sorted(p for p in (root / folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if self.max_per_class > 0:
                files = files[: self.max_per_class]
            samples += [(p, position[folder]) for p in files]
        return samples

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        root = Path(_imagenet_root({"root": None if self.root is None else str(self.root)})["root"])
        meta = imagenet_metadata()
        folders = imagenet_class_folders(root)
        wnids = meta["wnids"] if self.classes == "all" else folders
        position = {wnid: i for i, wnid in enumerate(wnids)}
        samples = self._samples(root, folders, position)
        if not samples:
            kinds = ", ".join(IMAGE_EXTENSIONS)
            raise UserError(f"imagenet-zs: no images ({kinds}) in the class folders of {root}")

        name_of = dict(zip(meta["wnids"], meta["names"], strict=True))
        classifier = zero_shot_classifier(ctx, [name_of[w] for w in wnids], meta["templates"])
        size = getattr(ctx.image_encoder, "image_size", 224)
        loader = DataLoader(_ImageFiles(samples, size), batch_size=self.batch_size, **loader_workers(self.workers))
        features, labels = [], []
        for images, ys in loader:
            features.append(ctx.encode_images(images))
            labels.append(ys)
        self._seen = {"root": str(root), "samples": len(samples), "class_folders": len(folders),
                      "candidates": len(wnids)}
        return topk_accuracy(torch.cat(features), classifier, torch.cat(labels))
