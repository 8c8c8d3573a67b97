"""The training loop's batch assembly (``orchestrator/engine/train.py``)."""

from __future__ import annotations

import pytest
import torch

from orchestrator.engine.train import _stack


def test_samples_are_stacked_as_torch_stack_does() -> None:
    """``_stack`` copies each sample into the batch as it is made (a list of them would be a second copy of the
    batch; docs/scale.md measures the memory): the same tensor as ``torch.stack``, and a sample of another shape
    is refused rather than broadcast into the batch."""
    samples = [torch.rand(3, 5, 4) for _ in range(6)]
    batch = _stack((sample for sample in samples), len(samples))
    assert torch.equal(batch, torch.stack(samples)) and batch.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[3, 5, 4\] at entry 0 and \[1, 5, 4\] at entry 2"):
        _stack(iter([samples[0], samples[1], torch.rand(1, 5, 4)]), 3)
