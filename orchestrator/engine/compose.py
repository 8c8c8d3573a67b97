"""Build the components of a resolved spec and join them into one trainable module."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from orchestrator.errors import UserError
from orchestrator.registry import Component, Registry


@dataclass
class Composition:
    dataset: Any
    model: RunModel
    sampler: Any
    evaluators: list[tuple[str, Any]]


class RunModel(nn.Module):
    """The towers and the loss as one module, so DeepSpeed owns every trainable parameter."""

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module | None, loss: nn.Module,
                 needs: set[str]) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.shared = text_encoder is image_encoder
        self.text_encoder = None if self.shared else text_encoder
        self.loss = loss
        self.needs = needs

    @property
    def text_tower(self) -> nn.Module | None:
        return self.image_encoder if self.shared else self.text_encoder

    def forward(self, batch: dict[str, Any], part: str = "all") -> dict[str, Any]:
        """The loss dict of a batch; ``part="encode"`` stops at the features and ``part="score"`` takes them
        instead of a batch: gradient caching (``orchestrator.engine.gradcache``) runs the two apart."""
        if part == "score":
            return self.score(batch)
        features = self.encode(batch)
        return features if part == "encode" else self.score(features)

    def encode(self, batch: dict[str, Any]) -> dict[str, Any]:
        """What the loss reads: the towers' embeddings (and tokens, views, labels) of a batch."""
        image_kwargs = {"modality": "image"} if self.shared else {}
        text_kwargs = {"modality": "text"} if self.shared else {}
        features: dict[str, Any] = {}
        if "image" in self.needs:
            features["image"] = self.image_encoder(batch["image"], **image_kwargs)
        if "views" in self.needs:
            features["views"] = self._embed_views(batch["views"], image_kwargs)
            features["view_inputs"] = batch["views"]
        if "image-tokens" in self.needs:
            features["image_tokens"], features["image_mask"] = self.image_encoder.forward_tokens(
                batch["image"], **image_kwargs)
        if "text" in self.needs:
            features["text"] = self.text_tower(batch["text"], **text_kwargs)
        if "text-tokens" in self.needs:
            features["text_tokens"], features["text_mask"] = self.text_tower.forward_tokens(
                batch["text"], **text_kwargs)
        if "label" in self.needs:
            features["label"] = batch["label"]
        return features

    def score(self, features: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss on the features of one batch (on each nested prefix, with Matryoshka encoders)."""
        nested = getattr(self.image_encoder, "nested_dims", ())
        return self._nested_loss(features, nested) if nested else self.loss(features)

    def _embed_views(self, views: list[torch.Tensor], kwargs: dict[str, str]) -> list[torch.Tensor]:
        """One forward over all views when they share a shape (as SimCLR concatenates its 2N views)."""
        if len({tuple(v.shape[1:]) for v in views}) == 1:
            return list(self.image_encoder(torch.cat(views), **kwargs).split(views[0].shape[0]))
        return [self.image_encoder(v, **kwargs) for v in views]

    def _nested_loss(self, features: dict[str, Any], dims: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Matryoshka (Kusupati et al. 2022): the loss on each prefix of the embeddings, averaged."""
        out: dict[str, torch.Tensor] = {}
        for d in dims:
            prefix = {k: v[..., :d] if k in ("image", "text") else v for k, v in features.items()}
            if "views" in features:
                prefix["views"] = [v[..., :d] for v in features["views"]]
            for key, value in self.loss(prefix).items():
                out[f"{key}@{d}"] = value
        out["loss"] = torch.stack([out[f"loss@{d}"] for d in dims]).mean()
        return out


def to_device(value: Any, device: torch.device, pin: bool = False) -> Any:
    """A batch (any nesting of tensors in dicts, lists and tuples) on ``device``; from pinned host memory the
    copies do not wait. ``pin``: copy host tensors into pinned memory first (a chunk of a batch too large to pin
    whole); a pinned tensor is not copied again."""
    if isinstance(value, torch.Tensor):
        if pin and value.device.type == "cpu":
            value = value.pin_memory()
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device, pin) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device, pin) for k, v in value.items()}
    return value


def build(registry: Registry, spec: dict[str, Any]) -> Composition:
    """Build every component with its resolved options. Seed first: all ranks then hold the same init."""
    torch.manual_seed(spec["trainer"]["seed"])
    dataset = build_component(registry, "dataset", spec["data"])
    image_encoder = build_component(registry, "encoder", spec["encoder"])
    shared = registry.get("encoder", spec["encoder"]["name"]).declared.get("modality") == "both"
    text_encoder = build_component(registry, "encoder", spec["text_encoder"]) if spec["text_encoder"] else None
    if shared:
        text_encoder = image_encoder
    nested, text_nested = getattr(image_encoder, "nested_dims", ()), getattr(text_encoder, "nested_dims", ())
    if text_nested and tuple(text_nested) != tuple(nested):
        raise UserError(f"the text encoder's nested_dims {tuple(text_nested)} differ from the image encoder's "
                        f"{tuple(nested)}: the loss is taken on the same prefixes of both, so give both the same")
    loss_component = registry.get("loss", spec["loss"]["name"])
    loss = build_component(registry, "loss", spec["loss"])
    if hasattr(loss, "bind"):  # momentum encoders and EMA teachers copy the image tower
        loss.bind(image_encoder)
    model = RunModel(image_encoder, text_encoder, loss, set(loss_component.declared.get("needs", ())))
    sampler = build_component(registry, "sampler", spec["sampler"])
    evaluators = [(e["name"], build_component(registry, "evaluator", e)) for e in spec["eval"]]
    return Composition(dataset, model, sampler, evaluators)


def build_component(registry: Registry, kind: str, entry: dict[str, Any]) -> Any:
    component = registry.get(kind, entry["name"])
    return component.build(_python_values(component, entry["options"]))


def _python_values(component: Component, options: dict[str, Any]) -> dict[str, Any]:
    """JSON stores tuples as lists and paths as strings: give the component the types it declared."""
    out = {}
    for key, value in options.items():
        option = component.option(key)
        tp = option.type if option else None
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        elif tp is Path and isinstance(value, str):
            value = Path(value)
        out[key] = value
    return out
