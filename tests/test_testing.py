"""orchestrator.testing helpers that plugin authors use beyond ``check``."""

from __future__ import annotations

from orchestrator.testing import metrics_at_init


def test_metrics_at_init_measure_the_untrained_run():
    """Zero-shot before training is near chance (10 classes); kNN of the random tower is deterministic per
    seed and changes with it, as the run's own initialisation does."""
    zs = metrics_at_init(encoder="vit", loss="infonce", eval="zs")
    assert set(zs) == {"zs/top1", "zs/top5"} and zs["zs/top1"] < 30
    first = metrics_at_init(encoder="vit", loss="ntxent", eval="knn")
    assert metrics_at_init(encoder="vit", loss="ntxent", eval="knn") == first
    assert metrics_at_init(seed=1, encoder="vit", loss="ntxent", eval="knn") != first
