"""Gradient caching (GradCache; Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup") gives the loss and the gradients of the uncached step: on one process, with every built-in
loss, with dropout and BatchNorm in the towers, on two gloo processes whose loss gathers across ranks through
the DeepSpeed engine (ZeRO 0 and 2, with accumulation), and in a real `orch run --grad-cache`.

Tolerance 1e-5 (relative to the largest gradient of each tensor): the cached step sums the same terms in another
order (per chunk), which moves fp32 results by a few ulps; a wrong cache (a missing chunk, a stale RNG state, a
double-counted loss parameter) is off by far more than that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from orchestrator.engine.compose import RunModel
from orchestrator.engine.gradcache import cached_step
from orchestrator.testing import leave_rank
from plugins.encoders.text_transformer import TextTransformer
from plugins.encoders.vit import VisionTransformer
from plugins.losses.infonce import InfoNCE
from tests.conftest import free_port

TOLERANCE = 1e-5


def _clip(seed: int = 0, tile: int = 0) -> RunModel:
    torch.manual_seed(seed)
    image = VisionTransformer(width=32, depth=2, heads=2, embed_dim=32)
    text = TextTransformer(width=32, depth=2, heads=2, embed_dim=32)
    return RunModel(image, text, InfoNCE(tile=tile), {"image", "text"})


def _pairs(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 28, 28, generator=generator),
            "text": torch.randint(0, 256, (n, 32), generator=generator)}


def _assert_same_gradients(reference: nn.Module, cached: nn.Module) -> None:
    for (name, a), b in zip(reference.named_parameters(), cached.parameters()):
        if a.grad is None:
            assert b.grad is None, name
            continue
        worst = (a.grad - b.grad).abs().max().item()
        assert worst <= TOLERANCE * max(1.0, a.grad.abs().max().item()), f"{name}: {worst}"


@pytest.mark.parametrize("tile", [0, 7])
def test_infonce_loss_and_gradients_equal_the_full_batch(tile: int) -> None:
    batch = _pairs(24)
    reference, cached = _clip(), _clip(tile=tile)  # tiled: the cached loss never holds all 24 x 24 logits
    expected = reference(batch)
    expected["loss"].backward()
    out = cached_step(cached, batch, chunk=5)  # 5 chunks, the last one short
    assert abs(out["loss"].item() - expected["loss"].item()) <= TOLERANCE
    assert not out["loss"].requires_grad
    assert cached.loss.logit_scale.grad is not None  # the temperature learns from the cached loss too
    _assert_same_gradients(reference, cached)


def test_views_loss_equals_the_full_batch() -> None:
    ntxent = pytest.importorskip("plugins.losses.ntxent")
    generator = torch.Generator().manual_seed(2)
    batch = {"views": [torch.randn(16, 3, 28, 28, generator=generator) for _ in range(2)]}
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(RunModel(VisionTransformer(width=32, depth=2, heads=2, embed_dim=32), None,
                               ntxent.NTXent(temperature=0.2), {"views"}))
    reference, cached = models
    expected = reference(batch)
    expected["loss"].backward()
    out = cached_step(cached, batch, chunk=6)
    assert abs(out["loss"].item() - expected["loss"].item()) <= TOLERANCE
    _assert_same_gradients(reference, cached)


def _built_in_losses() -> list[str]:
    from orchestrator.registry import Registry

    return sorted(n for n, c in Registry.load().components["loss"].items() if c.distribution == "orch")


# 1024-wide projectors sum enough fp32 rounding that gradients which are 0 in exact arithmetic (a bias before
# a batch norm) differ by ~1e-5 between any two evaluation orders; narrower heads keep the check at 1e-5.
NARROW_HEADS = {"barlow-twins": ":projector=[64,64,64]", "vicreg": ":projector=[64,64,64]"}


@pytest.mark.parametrize("name", _built_in_losses())
def test_every_built_in_loss_gets_the_full_batch_gradients(name: str) -> None:
    """Image-text, token-wise, views, labels, queues, teachers, prototypes: each loss reads the whole batch
    once, so the cached step is exact for all of them (a loss with state updates it once, as without caching)."""
    from orchestrator.engine.compose import build
    from orchestrator.registry import Registry
    from orchestrator.spec import resolve_run

    registry = Registry.load()
    choices = {"loss": name + NARROW_HEADS.get(name, ""), "encoder": "vit:width=32,depth=1,heads=2,embed_dim=32",
               "text_encoder": "text-transformer:width=32,depth=1,heads=2,embed_dim=32"}
    if not ({"text", "text-tokens"} & set(registry.get("loss", name).declared.get("needs", ()))):
        del choices["text_encoder"]
    spec = resolve_run(registry, choices, {"batch_size": "16"})
    reference, cached = build(registry, spec).model, build(registry, spec).model
    generator = torch.Generator().manual_seed(0)
    needs, batch = reference.needs, {}
    if needs & {"image", "image-tokens"}:
        batch["image"] = torch.randn(16, 3, 28, 28, generator=generator)
    if needs & {"text", "text-tokens"}:
        batch["text"] = reference.text_tower.tokenize([f"a photo of the digit {i % 10}" for i in range(16)])
    if "views" in needs:
        batch["views"] = [torch.randn(16, 3, 28, 28, generator=generator) for _ in reference.loss.views]
    if "label" in needs:
        batch["label"] = torch.arange(16) % 4
    torch.manual_seed(3)
    expected = reference(batch)
    expected["loss"].backward()
    torch.manual_seed(3)
    out = cached_step(cached, batch, chunk=5)
    assert abs(out["loss"].item() - expected["loss"].item()) <= TOLERANCE * max(1.0, abs(expected["loss"].item()))
    _assert_same_gradients(reference, cached)
    for a, b in zip(reference.buffers(), cached.buffers()):  # queues, centres, EMA teachers: updated once
        assert torch.equal(a, b)


class _NoisyTower(nn.Module):
    """A tower with dropout and BatchNorm: what the second pass must replay (masks) and not double (statistics)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 28 * 28, 64), nn.BatchNorm1d(64), nn.GELU(),
                                 nn.Dropout(0.3), nn.Linear(64, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_dropout_masks_are_replayed_and_batchnorm_statistics_move_once_per_chunk() -> None:
    """The reference encodes chunk by chunk with a graph (as GradCache's second pass does), so BatchNorm
    normalises per chunk in both; the cached step must draw the same dropout masks in its second pass as in
    its first, update the running statistics once per chunk, and leave the RNG where the reference does."""
    batch, chunk = _pairs(24), 8

    def model() -> RunModel:
        torch.manual_seed(0)
        return RunModel(_NoisyTower(), TextTransformer(width=32, depth=1, heads=2, embed_dim=32), InfoNCE(),
                        {"image", "text"})

    reference, cached = model(), model()
    torch.manual_seed(5)
    parts = [reference.encode({k: v[i:i + chunk] for k, v in batch.items()}) for i in range(0, 24, chunk)]
    expected = reference.score({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    expected["loss"].backward()
    after_reference = torch.get_rng_state()

    torch.manual_seed(5)
    out = cached_step(cached, batch, chunk)
    assert torch.equal(torch.get_rng_state(), after_reference)
    assert abs(out["loss"].item() - expected["loss"].item()) <= TOLERANCE
    _assert_same_gradients(reference, cached)
    norm_ref, norm = reference.image_encoder.net[2], cached.image_encoder.net[2]
    assert norm.num_batches_tracked.item() == norm_ref.num_batches_tracked.item() == 3
    torch.testing.assert_close(norm.running_mean, norm_ref.running_mean, rtol=0, atol=TOLERANCE)
    torch.testing.assert_close(norm.running_var, norm_ref.running_var, rtol=0, atol=TOLERANCE)


def test_a_chunk_of_the_whole_batch_or_more_is_the_plain_step() -> None:
    batch = _pairs(8)
    reference, cached = _clip(), _clip()
    reference(batch)["loss"].backward()
    cached_step(cached, batch, chunk=64)
    _assert_same_gradients(reference, cached)


# --- two gloo processes, through the DeepSpeed engine ---------------------------------------------------------

# bf16 autocast keeps 8 mantissa bits and chunked matmuls round differently: measured, cached vs uncached bf16
# 1.1e-2 to 2.1e-2 (relative to each tensor's largest gradient), while uncached bf16 itself is 1.7e-2 from fp32.
BF16_TOLERANCE = 5e-2


def _engine(zero: int, world: int, accum: int, batch: int, precision: str) -> Any:
    import deepspeed

    from orchestrator.engine.dsconfig import deepspeed_config

    model = _clip()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = {"batch_size": batch, "accum": accum, "grad_clip": 0.0, "zero": zero}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(trainer, world, precision))
    return engine


def _rank(rank: int, world: int, port: int, results: str) -> None:
    """One rank: per configuration, an uncached and a cached engine see the same micro-batches (2 accumulation
    steps, 2 optimizer steps); it records the largest differences of their losses and of their reduced
    gradients (DeepSpeed's full gradient, at the accumulation boundary), relative to the gradient's scale."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from deepspeed.utils import safe_get_full_grad

    from orchestrator.engine.gradcache import engine_cached_step

    size, accum = 32, 2
    batch, micro = _pairs(size), size // world // accum
    report = {}
    for zero, precision in ENGINE_CONFIGS:
        plain = _engine(zero, world, accum, size, precision)
        cached = _engine(zero, world, accum, size, precision)
        loss_diff = grad_diff = 0.0
        for _ in range(2):
            for k in range(accum):
                start = (k * world + rank) * micro
                piece = {key: value[start:start + micro] for key, value in batch.items()}
                expected = plain(piece)
                plain.backward(expected["loss"])
                out = engine_cached_step(cached, piece, chunk=3)
                loss_diff = max(loss_diff, abs(out["loss"].item() - expected["loss"].item()))
                if k == accum - 1:  # at the boundary: reduced over ranks and accumulation steps
                    for a, b in zip(plain.module.parameters(), cached.module.parameters()):
                        ga, gb = safe_get_full_grad(a).float(), safe_get_full_grad(b).float()
                        grad_diff = max(grad_diff, (ga - gb).abs().max().item() / max(1.0, ga.abs().max().item()))
                plain.step()
                cached.step()
        report[f"zero{zero}-{precision}"] = {"loss": loss_diff, "grad": grad_diff}
    Path(results, f"rank{rank}.json").write_text(json.dumps(report))
    leave_rank()


ENGINE_CONFIGS = [(0, "fp32"), (2, "fp32"), (0, "bf16")]


@pytest.mark.slow
def test_two_gloo_processes_through_deepspeed(tmp_path: Path) -> None:
    """ZeRO 0 and 2 in fp32 within 1e-5, and bf16 (DeepSpeed's torch_autocast: the cached step runs the loss
    under the engine's autocast, as the uncached forward does) within bf16's own rounding, 5e-2."""
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(report) == sorted(f"zero{z}-{p}" for z, p in ENGINE_CONFIGS)
        for name, worst in report.items():
            tolerance = BF16_TOLERANCE if name.endswith("bf16") else TOLERANCE
            assert worst["loss"] <= tolerance and worst["grad"] <= tolerance, (rank, name, worst)


@pytest.mark.slow
def test_orch_run_with_grad_cache_matches_the_run_without(workdir: Path) -> None:
    from orchestrator.store import Store
    from tests.conftest import orch

    small = ["--encoder", "vit:depth=1,width=64,embed_dim=64", "--text-encoder",
             "text-transformer:depth=1,width=64,embed_dim=64", "--batch-size", "64", "--steps", "4",
             "--log-every", "1", "--eval", "zs:split=test", "--quiet"]
    for extra in ([], ["--grad-cache", "16"], ["--grad-cache", "16", "--loss", "infonce:tile=24"]):
        result = orch("run", *small, *extra, cwd=workdir)
        assert result.returncode == 0, result.stdout + result.stderr
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    assert store.run(2)["spec"]["trainer"]["grad_cache"] == 16
    assert store.run(3)["spec"]["loss"]["options"]["tile"] == 24
    curves = [[m["value"] for m in store.metrics(i) if m["name"] == "train/loss"] for i in (1, 2, 3)]
    assert len(curves[0]) == 4
    # Four AdamW steps on gradients that agree to 1e-6: AdamW's near-sign first updates could turn a flipped
    # near-zero component into a move of 2 lr, hence 1e-4 rather than 1e-6; a broken cache moves the loss by 1e-1.
    assert curves[1] == pytest.approx(curves[0], abs=1e-4)
    assert curves[2] == pytest.approx(curves[0], abs=1e-4)


@pytest.mark.slow
def test_the_gradcache_bench_compares_losses_and_chunks(tmp_path: Path) -> None:
    """bench/gradcache.py, small: every loss runs every configuration, each in its own process, and caching and
    tiling change memory and time, never the first step's loss."""
    import re
    import subprocess
    import sys

    out = tmp_path / "gradcache.json"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "bench/gradcache.py", "--batch-size", "64", "--chunks", "16", "--steps",
                             "1", "--threads", "1", "--loss", "infonce", "--loss", "infonce:tile=16",
                             "--distinct-images", "24", "--json", str(out)],
                            cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["loss"], r["chunk"]) for r in results] == [("infonce", 0), ("infonce", 16), ("infonce:tile=16", 0),
                                                         ("infonce:tile=16", 16)]
    assert all(r["samples_per_s"] > 0 and 0 < r["batch_s"] < r["setup_s"] for r in results)
    assert [r["first_loss"] for r in results] == pytest.approx([results[0]["first_loss"]] * 4, abs=1e-5)
    assert re.search(r"\|\s*infonce:tile=16\s*\|\s*16\s*\|\s*ok\s*\|", result.stdout), result.stdout


@pytest.mark.slow
def test_the_host_memory_bench_runs_orch_on_a_csv_of_jpegs(tmp_path: Path) -> None:
    """bench/host_memory.py, small: one training ``orch run`` per --workers value and one kNN evaluation on the JPEGs
    it writes, each reporting the peak resident set of the run's largest process beside the pixels it must hold."""
    import subprocess
    import sys

    out = tmp_path / "host_memory.json"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "bench/host_memory.py", "--batch-size", "32", "--grad-cache", "8",
                             "--image-size", "32", "--source-size", "48", "--steps", "1", "--workers", "0",
                             "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert payload["images"] == 48
    train, evaluate = payload["results"]
    assert (train["what"], train["workers"], evaluate["what"]) == ("train", 0, "evaluate (knn)")
    assert train["reference_bytes"] == 32 * 3 * 32 * 32 * 4 and evaluate["reference_bytes"] == 38 * 3 * 32 * 32 * 4
    for row in (train, evaluate):  # a process that imported torch, not the bench's own few MB
        assert 200e6 < row["peak_rss_bytes"] < 8e9
    assert "| evaluate (knn) | 0 " in result.stdout and "peak / reference" in result.stdout


def test_the_bench_repeats_its_drawn_images_through_the_batch() -> None:
    """bench/gradcache.py --distinct-images: the first images as drawn without it, then the same again in order."""
    from bench.gradcache import synthetic_images

    every = synthetic_images((64, 3, 4, 4), 0)
    assert every.unique().numel() == every.numel()  # all drawn
    repeated = synthetic_images((64, 3, 4, 4), 24)
    assert torch.equal(repeated[:24], every[:24])
    assert all(torch.equal(repeated[i], repeated[i % 24]) for i in range(64))
    assert torch.equal(synthetic_images((64, 3, 4, 4), 100), every)  # more than the batch: all drawn

