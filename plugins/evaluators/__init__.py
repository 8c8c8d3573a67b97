"""Built-in evaluators: zero-shot (the run's dataset, ImageNet), kNN, linear and few-shot probes, retrieval."""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

from orchestrator import hookimpl
from orchestrator.errors import UserError

IMAGENET_ENV = "ORCH_IMAGENET_ROOT"
IMAGENET_METADATA = Path(__file__).with_name("imagenet_zeroshot.json")
_HOW = f"give it with --eval imagenet-zs:root=/path/to/imagenet/val or {IMAGENET_ENV}=/path/to/imagenet/val"


@lru_cache(maxsize=1)
def imagenet_metadata() -> dict[str, Any]:
    """``wnids`` (class-index order), CLIP's class ``names`` and 80 ``templates``, with their ``source``."""
    return json.loads(IMAGENET_METADATA.read_text(encoding="utf-8"))


def imagenet_class_folders(root: Path) -> list[str]:
    """The class folders (WordNet ids) under ``root``, sorted; a UserError unless every one is known."""
    if not root.is_dir():
        raise UserError(f"imagenet-zs: {root} is not a folder; {_HOW}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise UserError(f"imagenet-zs: {root} has no class subfolders: sort the validation images into one "
                        f"folder per WordNet id (ImageFolder layout, e.g. {root}/n01440764/*.JPEG)")
    known = set(imagenet_metadata()["wnids"])
    unknown = [f for f in folders if f not in known]
    if unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise UserError(f"imagenet-zs: folder(s) {shown} in {root} are not ImageNet-1k WordNet ids "
                        f"(like n01440764): point root at the validation folder in ImageFolder layout")
    return folders


def _imagenet_root(options: dict[str, Any]) -> dict[str, Any]:
    """Queue time: fill ``root`` from ORCH_IMAGENET_ROOT when not given, check it, store it absolute."""
    raw = options.get("root") or os.environ.get(IMAGENET_ENV)
    if not raw:
        raise UserError(f"imagenet-zs needs the ImageNet validation folder: {_HOW}")
    root = Path(raw).expanduser().absolute()
    imagenet_class_folders(root)
    return {**options, "root": str(root)}


@hookimpl
def register_evaluators(register: Any) -> None:
    register("zs", "plugins.evaluators.zs:ZeroShot", needs={"label", "text-tower"})
    register("knn", "plugins.evaluators.knn:KNN", needs={"label"})
    register("linear-probe", "plugins.evaluators.linear_probe:LinearProbe", needs={"label"})
    register("few-shot", "plugins.evaluators.few_shot:FewShot", needs={"label"})
    register("retrieval", "plugins.evaluators.retrieval:Retrieval", needs={"text", "text-tower"})
    register("imagenet-zs", "plugins.evaluators.imagenet_zs:ImageNetZeroShot", needs={"text-tower"},
             resolve=_imagenet_root)
