"""How fast an evaluation reads a split of image files: ``EvalContext.encode_split`` with 0, 1 and 2 loader workers.

kNN, linear-probe and few-shot encode whole splits (a kNN bank is the whole train split), so on a dataset that
decodes its images from files the evaluation is an input pipeline of its own. This writes ``--images`` photo-like
JPEGs (bench/loader.py's) and a CSV of them with labels, builds the ``csv`` dataset decoding them at 224 px, and
times ``encode_split`` of its train split under a one-block ViT (so decoding, not the model, is what is timed),
alternating the worker counts round by round after a warm-up pass. Reported: images/s per worker count, and the
ratio to ``--workers 0`` (the rank's own process decoding, as before workers were used here).

    python bench/evaluate.py                                  # 2,000 JPEGs of 256 px; workers 0, 1, 2
    python bench/evaluate.py --source-size 640 --workers 0,4
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from bench._common import header, int_list, median, table, write_json  # noqa: E402
from bench.host_memory import write_pairs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="JPEG files (the train split is 80% of them)")
    parser.add_argument("--source-size", type=int, default=256, help="side of the JPEG files")
    parser.add_argument("--workers", type=int_list, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per worker count, alternating")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    info = header("evaluate")

    import torch

    from orchestrator.engine.compose import build
    from orchestrator.engine.evaluation import EvalContext
    from orchestrator.registry import Registry
    from orchestrator.spec import resolve_run

    with tempfile.TemporaryDirectory(prefix="orch-bench-evaluate-") as tmp:
        pairs = write_pairs(Path(tmp), args.images, args.source_size)
        registry = Registry.load()
        spec = resolve_run(registry, {"data": f"csv:path={pairs},label_column=label,image_size=224",
                                      "encoder": "vit:image_size=224,patch_size=32,width=32,depth=1,heads=2",
                                      "loss": "ntxent", "eval": ["knn"]}, {})
        comp = build(registry, spec)
        encoder, split = comp.model.image_encoder.eval(), comp.dataset.train
        times: dict[int, list[float]] = {w: [] for w in args.workers}
        for round_ in range(args.rounds + 1):  # round 0 warms the page cache and is not kept
            for workers in args.workers if round_ % 2 else args.workers[::-1]:
                ctx = EvalContext(encoder, None, comp.dataset, torch.device("cpu"), workers=workers)
                start = time.perf_counter()
                ctx.encode_split(split)
                if round_:
                    times[workers].append(time.perf_counter() - start)
    base = len(split) / median(times[args.workers[0]])
    rows, results = [], []
    for workers in args.workers:
        rate = len(split) / median(times[workers])
        rows.append([workers, rate, rate / base, ", ".join(f"{t:.2f}" for t in times[workers])])
        results.append({"workers": workers, "images_per_s": rate, "seconds": times[workers]})
    print(f"encode_split of {len(split)} JPEGs of {args.source_size} px decoded at 224 px, {args.rounds} rounds\n")
    print(table(["workers", "images/s (median)", f"vs workers {args.workers[0]}", "seconds per pass"], rows))
    write_json(args.json, {**info, "args": vars(args), "split": len(split), "results": results})


if __name__ == "__main__":
    main()
