"""Why DINO's loss sits at ln(out_dim) on the shipped MNIST: how alike its teacher's targets are at step 0.

Builds the run's vit and DINO loss exactly as ``orch run --encoder vit --loss dino...`` does (seed 0), feeds
256 train digits (no augmentation) and prints, with and without batch norm in the head (``bn``):
- the mean pairwise cosine of the encoder's outputs and of the head's L2-normalised bottleneck features;
- the std of the teacher's logits across digits and across the head's outputs;
- the entropy of the centred teacher targets ``softmax((t - mean(t)) / 0.04)`` against ln(out_dim): near
  ln(out_dim) means uniform targets, the collapse (docs/methods.md, dino).

    python bench/dino_start.py
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import math  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench._common import header  # noqa: E402
from orchestrator.engine.compose import build  # noqa: E402
from orchestrator.registry import Registry  # noqa: E402
from orchestrator.spec import resolve_run  # noqa: E402


def mean_pairwise_cosine(x: torch.Tensor) -> float:
    x = F.normalize(x, dim=-1)
    return (x @ x.T).mean().item()


def start(registry: Registry, loss: str, samples: int = 256) -> dict[str, float]:
    """The step-0 statistics of one DINO setting, built as the run builds it (seed 0)."""
    run = build(registry, resolve_run(registry, {"encoder": "vit", "loss": loss}, {"seed": "0"}))
    model, dataset = run.model, run.dataset
    images = torch.stack([model.image_encoder.transform(dataset.train[i]["image"]) for i in range(samples)])
    dino = model.loss
    with torch.no_grad():
        outputs = model.image_encoder(images)
        bottleneck = dino.head.mlp(outputs)
        logits = dino.teacher(images)
        targets = F.softmax((logits - logits.mean(0, keepdim=True)) / dino.teacher_temp, dim=-1)
        entropy = -(targets * targets.clamp_min(1e-30).log()).sum(-1).mean().item()
    return {"encoder output cosine": mean_pairwise_cosine(outputs),
            "bottleneck cosine": mean_pairwise_cosine(bottleneck),
            "logit std across digits": logits.std(0).mean().item(),
            "logit std across outputs": logits.std(1).mean().item(),
            "centred target entropy": entropy, "ln(out_dim)": math.log(logits.shape[1])}


def main() -> None:
    header("dino_start: how alike DINO's teacher targets are at step 0 (shipped MNIST, seed 0)")
    torch.set_num_threads(1)
    registry = Registry.load()
    settings = ["dino", "dino:bn=true"]
    rows = {setting: start(registry, setting) for setting in settings}
    print("| statistic | " + " | ".join(f"`{s}`" for s in settings) + " |")
    print("|---|" + "---|" * len(settings))
    for key in rows[settings[0]]:
        print(f"| {key} | " + " | ".join(f"{rows[s][key]:.3f}" for s in settings) + " |")


if __name__ == "__main__":
    main()
