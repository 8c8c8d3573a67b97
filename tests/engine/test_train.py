"""The training loop's loader and batch assembly (``orchestrator/engine/train.py``)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.engine.train import _stack, make_loader
from orchestrator.spec import resolve_trainer


def test_samples_are_stacked_as_torch_stack_does() -> None:
    """``_stack`` copies each sample into the batch as it is made (a list of them would be a second copy of the
    batch; docs/scale.md measures the memory): the same tensor as ``torch.stack``, and a sample of another shape
    is refused rather than broadcast into the batch."""
    samples = [torch.rand(3, 5, 4) for _ in range(6)]
    batch = _stack((sample for sample in samples), len(samples))
    assert torch.equal(batch, torch.stack(samples)) and batch.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[3, 5, 4\] at entry 0 and \[1, 5, 4\] at entry 2"):
        _stack(iter([samples[0], samples[1], torch.rand(1, 5, 4)]), 3)


@pytest.mark.parametrize(("grad_cache", "pinned"), [("0", True), ("16", False)])
def test_on_a_gpu_the_loader_pins_whole_batches_only_without_caching(grad_cache: str, pinned: bool) -> None:
    """With --grad-cache the cached step pins each chunk as it copies it (``cached_step``), so the loader must not
    pin the whole batch: at 65,536 images of 224 px that would be a 64 GiB pinned block beside the batch. The
    loader is only built here (nothing touches a GPU); tests/engine/test_gpu.py runs the step from host memory."""
    trainer = resolve_trainer({"grad_cache": grad_cache})
    for device, pin in ((torch.device("cuda"), pinned), (torch.device("cpu"), False)):
        _, loader = make_loader(list(range(8)), None, trainer, rank=0, device=device)
        assert loader.pin_memory is pin
