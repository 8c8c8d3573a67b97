"""Build the components of a resolved spec and join them into one trainable module."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

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

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        features: dict[str, torch.Tensor] = {}
        if "image" in self.needs:
            kwargs = {"modality": "image"} if self.shared else {}
            features["image"] = self.image_encoder(batch["image"], **kwargs)
        if "text" in self.needs:
            kwargs = {"modality": "text"} if self.shared else {}
            features["text"] = self.text_tower(batch["text"], **kwargs)
        if "label" in self.needs:
            features["label"] = batch["label"]
        return self.loss(features)


def build(registry: Registry, spec: dict[str, Any]) -> Composition:
    """Build every component with its resolved options. Seed first: all ranks then hold the same init."""
    torch.manual_seed(spec["trainer"]["seed"])
    dataset = build_component(registry, "dataset", spec["data"])
    image_encoder = build_component(registry, "encoder", spec["encoder"])
    shared = registry.get("encoder", spec["encoder"]["name"]).declared.get("modality") == "both"
    text_encoder = build_component(registry, "encoder", spec["text_encoder"]) if spec["text_encoder"] else None
    if shared:
        text_encoder = image_encoder
    loss_component = registry.get("loss", spec["loss"]["name"])
    loss = build_component(registry, "loss", spec["loss"])
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
