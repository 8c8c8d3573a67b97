"""The training loop's loader, batch assembly and signs of life (``orchestrator/engine/train.py``)."""

from __future__ import annotations

import faulthandler
import time
from pathlib import Path

import pytest
import torch

from orchestrator.engine.compose import build
from orchestrator.engine.train import SignOfLife, _collate, _Rows, make_loader
from orchestrator.registry import Registry
from orchestrator.spec import resolve_run, resolve_trainer
from tests.conftest import AliveImages


def test_samples_are_stacked_as_torch_stack_does() -> None:
    """``_Rows`` copies each sample into the batch as it is made (a list of them would be a second copy of the
    batch; docs/scale.md measures the memory): the same tensor as ``torch.stack``, and a sample of another shape
    is refused rather than broadcast into the batch."""
    samples = [torch.rand(3, 5, 4) for _ in range(6)]
    rows = _Rows(len(samples))
    for sample in samples:
        rows.add(sample)
    assert torch.equal(rows.out, torch.stack(samples)) and rows.out.dtype == torch.float32
    rows = _Rows(3)
    rows.add(samples[0])
    rows.add(samples[1])
    with pytest.raises(ValueError, match=r"\[3, 5, 4\] at entry 0 and \[1, 5, 4\] at entry 2"):
        rows.add(torch.rand(1, 5, 4))


def _filled_in_shared_memory(samples: list[torch.Tensor]) -> bool:
    rows = _Rows(len(samples))
    for sample in samples:
        rows.add(sample)
    return rows.out.is_shared() and torch.equal(rows.out, torch.stack(samples))


def test_a_loader_worker_fills_its_batch_in_shared_memory() -> None:
    """A worker's batch is sent to the training process through shared memory: filled there directly, as torch's
    default_collate does, it is not copied into it on the way (a second batch in the worker while it is sent)."""
    samples = [torch.rand(3, 4, 4) for _ in range(5)]
    assert not _filled_in_shared_memory(samples)  # the training process itself loads (--workers 0)
    loader = torch.utils.data.DataLoader(samples, batch_size=5, num_workers=1, collate_fn=_filled_in_shared_memory)
    assert next(iter(loader)) is True


@pytest.mark.parametrize("loss", ["infonce", "ntxent"])
def test_the_loader_decodes_a_batch_one_sample_at_a_time(loss: str) -> None:
    """Collation holds a decoded sample or two beside the batch it fills, never the whole micro-batch (for a
    dataset that decodes at 224 px, that list was a second copy of the batch); the batch is the one the samples
    make, image and text (CLIP) or seeded views (SimCLR)."""
    registry = Registry.load()
    choices = {"loss": loss, "encoder": "vit:depth=1,width=32,embed_dim=32", "eval": ["knn"]}
    if loss == "infonce":
        choices["text_encoder"] = "text-transformer:depth=1,width=32,embed_dim=32"
    spec = resolve_run(registry, choices, {})
    comp = build(registry, spec)
    split = AliveImages(comp.dataset.train)
    shards, loader = make_loader(split, comp.model, spec["trainer"], rank=0, device=torch.device("cpu"))
    shards.batches = [[(3, i) for i in range(5, 21)]]
    batch = next(iter(loader))
    assert split.most_alive <= 2 and split.alive == 0  # the last sample, while the next is read
    expected = _collate([(i, comp.dataset.train[i]) for i in range(5, 21)], comp.model, seed=spec["trainer"]["seed"],
                        epoch=3)
    assert batch.keys() == expected.keys()
    for key, value in batch.items():
        if key == "views":
            assert len(value) == 2 and all(torch.equal(a, b) for a, b in zip(value, expected["views"]))
        else:
            assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize(("grad_cache", "pinned"), [("0", True), ("16", False)])
def test_on_a_gpu_the_loader_pins_whole_batches_only_without_caching(grad_cache: str, pinned: bool) -> None:
    """With --grad-cache the cached step pins each chunk as it copies it (``cached_step``), so the loader must not
    pin the whole batch: at 65,536 images of 224 px that would be a 64 GiB pinned block beside the batch. The
    loader is only built here (nothing touches a GPU); tests/engine/test_gpu.py runs the step from host memory."""
    trainer = resolve_trainer({"grad_cache": grad_cache})
    for device, pin in ((torch.device("cuda"), pinned), (torch.device("cpu"), False)):
        _, loader = make_loader(list(range(8)), None, trainer, rank=0, device=device)
        assert loader.pin_memory is pin


def test_signs_of_life_hold_off_the_stacks_and_silence_brings_them(tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture) -> None:
    """--stall-timeout's rank side: each sign touches the file the worker watches and puts off faulthandler's dump of
    every thread's stack; a pause (a rank waiting for rank 0's evaluation) puts it off until the next sign."""
    path = tmp_path / "attempt-1.alive"
    alive = SignOfLife(path, 3.0)  # re-armed at most once a second: 2 s to spare for a loaded machine
    try:
        first = path.stat().st_mtime_ns
        for _ in range(8):  # 4 s of signs, each well within the timeout
            time.sleep(0.5)
            alive()
        assert "Timeout" not in capfd.readouterr().err
        assert path.stat().st_mtime_ns > first
        alive.pause()
        time.sleep(4)
        assert "Timeout" not in capfd.readouterr().err
        alive()
        time.sleep(4.5)  # silent past the timeout
        err = capfd.readouterr().err
        assert err.count("Timeout (0:00:03)!") == 1, err
        assert "in test_signs_of_life_hold_off_the_stacks_and_silence_brings_them" in err, err
    finally:
        faulthandler.cancel_dump_traceback_later()
