"""The engine's side of self-supervised losses: seeded per-sample views, one forward over all views,
teachers bound before training, Matryoshka prefixes, and the composition checks at queue time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from orchestrator.engine.compose import RunModel, build
from orchestrator.engine.train import _collate
from orchestrator.registry import Registry
from orchestrator.spec import resolve_run
from tests.conftest import orch


@pytest.fixture(scope="module")
def ntxent() -> tuple:
    registry = Registry.load()
    spec = resolve_run(registry, {"loss": "ntxent", "encoder": "vit:depth=1,width=32,embed_dim=32",
                                  "eval": ["knn"]}, {})
    comp = build(registry, spec)
    return comp, [(i, comp.dataset.train[i]) for i in range(8)]


def test_a_views_augmentation_depends_on_seed_epoch_index_and_view_only(ntxent: tuple) -> None:
    comp, samples = ntxent
    batch = _collate(samples, comp.model, seed=0, epoch=0)
    assert len(batch["views"]) == len(comp.model.loss.views) == 2 and batch["views"][0].shape == (8, 3, 28, 28)
    assert not torch.equal(batch["views"][0], batch["views"][1])  # two different views of each sample
    state = torch.get_rng_state()
    reordered = _collate(samples[4:] + samples[:4], comp.model, seed=0, epoch=0)  # another batch, other rows
    assert torch.equal(torch.get_rng_state(), state)  # the training RNG is untouched
    for v in range(2):
        assert torch.equal(reordered["views"][v], torch.cat([batch["views"][v][4:], batch["views"][v][:4]]))
    for other in (_collate(samples, comp.model, seed=0, epoch=1), _collate(samples, comp.model, seed=1, epoch=0)):
        assert not torch.equal(other["views"][0], batch["views"][0])


def test_all_views_go_through_the_encoder_in_one_forward(ntxent: tuple) -> None:
    comp, samples = ntxent
    batch = _collate(samples, comp.model, seed=0, epoch=0)
    calls = []
    handle = comp.model.image_encoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    out = comp.model(batch)
    handle.remove()
    assert calls == [16] and torch.isfinite(out["loss"])
    with torch.no_grad():  # a LayerNorm tower: the joint forward equals one forward per view
        joint = comp.model._embed_views(batch["views"], {})
        for view, embedding in zip(batch["views"], joint):
            assert torch.allclose(comp.model.image_encoder(view), embedding, atol=1e-5)


class Towers(nn.Module):
    """An image tower with Matryoshka widths (2, 4) and a loss that reports the width it saw."""

    nested_dims = (2, 4)

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class WidthLoss(nn.Module):
    def forward(self, batch: dict) -> dict:
        return {"loss": batch["image"].pow(2).sum(-1).mean(), "width": torch.tensor(float(batch["image"].shape[-1]))}


def test_nested_dims_average_the_loss_over_each_prefix() -> None:
    torch.manual_seed(0)
    tower = Towers()
    model = RunModel(tower, None, WidthLoss(), {"image"})
    x = torch.randn(5, 3)
    out = model({"image": x})
    z = tower(x)
    expected = [z[:, :d].pow(2).sum(-1).mean() for d in (2, 4)]
    assert torch.allclose(out["loss@2"], expected[0]) and torch.allclose(out["loss@4"], expected[1])
    assert torch.allclose(out["loss"], (expected[0] + expected[1]) / 2)
    assert out["width@2"].item() == 2 and out["width@4"].item() == 4


def test_bind_gives_a_teacher_that_is_saved_with_the_loss() -> None:
    registry = Registry.load()
    spec = resolve_run(registry, {"loss": "byol", "encoder": "vit:depth=1,width=32,embed_dim=32",
                                  "eval": ["knn"]}, {})
    model = build(registry, spec).model
    teacher_keys = [k for k in model.state_dict() if k.startswith("loss.") and "patch_embed" in k]
    assert teacher_keys  # the EMA copy of the image tower is part of the checkpointed module
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert all(id(p) not in trainable for k, p in model.named_parameters() if k in teacher_keys)
    assert sum(1 for k in model.state_dict() if k.startswith("image_encoder.")) > 0  # the student stays where it was


def test_queue_refuses_views_losses_without_images_and_token_losses_without_tokens(workdir: Path) -> None:
    (workdir / "pairs.csv").write_text("image,caption\n")
    no_tokens = orch("queue", "--loss", "filip", "--encoder", "resnet", cwd=workdir)
    assert no_tokens.returncode == 2 and no_tokens.stderr.count("\n") == 1
    assert "loss filip compares token features but encoder resnet gives none" in no_tokens.stderr
    text_only = orch("queue", "--loss", "ntxent", "--encoder", "text-transformer", cwd=workdir)
    assert text_only.returncode == 2 and "is a text encoder" in text_only.stderr
