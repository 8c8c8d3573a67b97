"""Encoder step time: one SimCLR-style training step (2 views of each image, forward + backward) per encoder.

Each encoder is built through the registry (``orchestrator.testing.build``: the options are resolved as
``orch queue`` resolves them), fed a fixed batch of ``2 x batch`` pre-transformed images (28 x 28 by
default, the shipped MNIST's size; the engine embeds all views in one forward when they share a shape),
and trained with NT-Xent (Chen et al. 2020, temperature 0.5) and SGD. Reported per encoder: parameters,
forward GFLOPs per image (``torch.utils.flop_counter``, machine-independent), the median and best seconds
per step after warmup, images (views) per second, the process CPU time per step (with ``--threads 1`` on a
busy machine, the CPU seconds are what one idle core would take: wall time there counts other processes'
turns too), and the same with activation checkpointing (``set_grad_checkpointing(True)``) when
``--checkpointing`` is given.

    python bench/encoders.py                                   # vit, resnet18, convnext_tiny at batch 128
    python bench/encoders.py --encoder resnet --encoder resnet:arch=resnet50 --steps 5 --threads 2
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from bench._common import header, median, table, write_json  # noqa: E402

DEFAULT_ENCODERS = ["vit", "resnet", "convnext"]


def nt_xent(a: Any, b: Any, temperature: float = 0.5) -> Any:
    """SimCLR's loss over the 2N views: each view's positive is its other view, the 2N - 2 others are negatives."""
    import torch
    import torch.nn.functional as F

    z = F.normalize(torch.cat([a, b]), dim=-1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = a.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, target)


def measure(choice: str, args: argparse.Namespace, checkpointing: bool) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from orchestrator.spec import parse_choice
    from orchestrator.testing import build

    name, raw = parse_choice(choice)
    torch.manual_seed(0)
    encoder = build("encoder", name, None, **raw)
    encoder.set_grad_checkpointing(checkpointing)
    views = torch.randn(2 * args.batch_size, encoder.in_channels, args.image_size, args.image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        encoder.eval()(views[:1])
    encoder.train()
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.01)

    def step() -> None:
        out = encoder(views)
        nt_xent(*out.chunk(2)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times, cpu_times = [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {"encoder": choice, "checkpointing": checkpointing, "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in encoder.parameters()),
            "gflops_per_image_forward": flops.get_total_flops() / 1e9, "batch_size": args.batch_size,
            "views_per_step": 2 * args.batch_size, "median_s_per_step": median(times), "best_s_per_step": min(times),
            "images_per_s": 2 * args.batch_size / median(times), "median_cpu_s_per_step": median(cpu_times),
            "times": times, "cpu_times": cpu_times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/encoders.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", action="append", default=None,
                        help="NAME[:k=v,...], repeatable (default: vit, resnet, convnext)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step, 2 views each (default 128)")
    parser.add_argument("--image-size", type=int, default=28, help="input side in pixels (default 28)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--checkpointing", action="store_true", help="also time with activation checkpointing")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    info = header("bench/encoders.py: encoder training step time (2 views, forward + backward)")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results = [measure(choice, args, ckpt) for choice in (args.encoder or DEFAULT_ENCODERS)
               for ckpt in ((False, True) if args.checkpointing else (False,))]
    print(table(["encoder", "checkpointing", "params", "fwd GFLOPs/image", "batch x views", "threads",
                 "median s/step", "best s/step", "views/s", "CPU s/step"],
                [[r["encoder"], "on" if r["checkpointing"] else "off", f"{r['parameters'] / 1e6:.1f}M",
                  f"{r['gflops_per_image_forward']:.3f}", f"{r['batch_size']} x 2", r["threads"],
                  f"{r['median_s_per_step']:.3f}", f"{r['best_s_per_step']:.3f}", f"{r['images_per_s']:.0f}",
                  f"{r['median_cpu_s_per_step']:.3f}"]
                 for r in results]))
    write_json(args.json, {**info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
