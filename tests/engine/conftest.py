"""Uninterrupted reference runs shared by the engine tests: test_zero2_equivalence compares ZeRO-2 on 2 processes
with 1 process, and test_resume_world_size compares a run resumed on N processes with the uninterrupted run on N;
the ZeRO-2 runs on 1 and 2 processes serve both, so each is trained once per session. ``tiny_clip`` and
``tiny_batch`` are for the tests that build the engine in-process."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
import torch

from orchestrator.engine.compose import RunModel
from orchestrator.store import Store
from plugins.encoders.text_transformer import TextTransformer
from plugins.encoders.vit import VisionTransformer
from plugins.losses.infonce import InfoNCE
from tests.conftest import orch

# A small CLIP run: 6 steps of 64, every loss logged, checkpoints at steps 3 and 6, zero-shot on the test split.
SMALL = ["--encoder", "vit:depth=1,width=64,embed_dim=64", "--text-encoder",
         "text-transformer:depth=1,width=64,embed_dim=64", "--batch-size", "64", "--steps", "6", "--log-every", "1",
         "--checkpoint-every", "3", "--eval", "zs:split=test", "--quiet"]


def tiny_clip() -> RunModel:
    """A CLIP small enough to build a DeepSpeed engine around in-process in a second; ``tiny_batch`` feeds it."""
    return RunModel(VisionTransformer(image_size=16, patch_size=8, width=32, depth=1, heads=2, embed_dim=16),
                    TextTransformer(width=32, depth=1, heads=2, context_length=12, embed_dim=16), InfoNCE(),
                    {"image", "text"})


def tiny_batch(size: int = 8, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(size, 3, 16, 16, generator=generator),
            "text": torch.randint(0, 256, (size, 12), generator=generator)}


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Any]]:
    """``uninterrupted(*flags)``: `orch run SMALL *flags` in a fresh working directory, trained on first use; its
    trainer spec and its logged train/loss as ``{"trainer": ..., "steps": [...], "losses": [...]}``."""
    runs: dict[tuple[str, ...], dict[str, Any]] = {}

    def run(*flags: str) -> dict[str, Any]:
        if flags not in runs:
            workdir = tmp_path_factory.mktemp("uninterrupted")
            result = orch("run", *SMALL, *flags, cwd=workdir)
            assert result.returncode == 0, result.stdout + result.stderr
            store = Store.open(f"sqlite:///{workdir}/experiments.db")
            logged = [m for m in store.metrics(1) if m["name"] == "train/loss"]
            runs[flags] = {"trainer": store.run(1)["spec"]["trainer"], "steps": [m["step"] for m in logged],
                           "losses": [m["value"] for m in logged]}
        return runs[flags]

    return run


@pytest.fixture
def one_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment torchrun gives a lone rank, on a free port: for tests that build the engine in-process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
