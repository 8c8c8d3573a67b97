"""Host memory of orch's training and evaluation paths on decoded images, against the bytes they must hold.

A ``--grad-cache`` batch is meant to be larger than the GPU holds, so the host holds it instead (docs/scale.md,
"Gradient caching"); and a kNN evaluation's bank is the whole train split. This writes ``--images`` photo-like
JPEGs (bench/loader.py's) and a CSV of them with a label column, then runs ``orch run`` on the ``csv`` dataset
decoding them at ``--image-size``:

- train: ``--batch-size`` with ``--grad-cache``, once per ``--workers`` value; the reference is one batch of fp32
  pixels;
- evaluate: a one-step run at batch 32 with ``--eval knn`` (the train split is the bank, encoded 256 at a time);
  the reference is the train split's fp32 pixels.

Each row is the peak resident set of the run's largest process (``wait4``'s ``ru_maxrss``, as ``/usr/bin/time -f
%M``) and its ratio to the reference. The towers are one-block ViT and text transformers, so the images, not the
model, fill the memory.

    python bench/host_memory.py                                  # batch 2048 of 224 px, workers 0 and 1
    python bench/host_memory.py --batch-size 4096 --grad-cache 512 --workers 0
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import csv  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from bench._common import header, int_list, orch_command, table, write_json  # noqa: E402
from bench.loader import photo_jpeg  # noqa: E402

TEST_FRACTION = 0.2  # the csv dataset's default: the train split must still hold one batch


def write_pairs(folder: Path, count: int, side: int) -> Path:
    """``count`` JPEGs of ``side`` x ``side`` under ``folder/images`` and ``folder/pairs.csv`` listing them, with
    captions and 10 labels."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        name = f"images/{i:06d}.jpg"
        (folder / name).write_bytes(photo_jpeg(side, side, i))
        rows.append([name, f"a photo of item {i}.", f"class{i % 10}"])
    with open(folder / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption", "label"], *rows])
    return folder / "pairs.csv"


def peak_rss(command: list[str], cwd: Path) -> tuple[int, float]:
    """Run ``command``; the largest resident set (bytes) of it and its descendants, and the wall seconds."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{output[-3000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # Linux reports kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--grad-cache", type=int, default=512, help="chunk size (--grad-cache of orch run)")
    parser.add_argument("--image-size", type=int, default=224, help="pixels the dataset decodes to")
    parser.add_argument("--source-size", type=int, default=256, help="side of the JPEG files")
    parser.add_argument("--images", type=int, default=None, help="files (default: enough for one batch)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--workers", type=int_list, default=[0, 1], help="loader processes, one run each")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    info = header("host_memory")
    images = args.images or int(args.batch_size / (1 - TEST_FRACTION)) + 8
    pixel_bytes = 3 * args.image_size ** 2 * 4
    batch_bytes = args.batch_size * pixel_bytes
    train_images = images - min(max(round(images * TEST_FRACTION), 1), images - 1)  # the csv dataset's split
    rows, results = [], []
    with tempfile.TemporaryDirectory(prefix="orch-host-memory-") as tmp:
        folder = Path(tmp)
        data = f"csv:path={write_pairs(folder, images, args.source_size)},image_size={args.image_size}"
        towers = ["--encoder", f"vit:image_size={args.image_size},patch_size=32,width=32,depth=1,heads=2,embed_dim=32",
                  "--text-encoder", "text-transformer:width=32,depth=1,heads=2,embed_dim=32"]
        runs = [("train", workers, batch_bytes,
                 ["--data", data, "--eval", "retrieval", "--batch-size", str(args.batch_size), "--grad-cache",
                  str(args.grad_cache), "--steps", str(args.steps), "--workers", str(workers)])
                for workers in args.workers]
        runs.append(("evaluate (knn)", 0, train_images * pixel_bytes,
                     ["--data", f"{data},label_column=label", "--eval", "knn", "--batch-size", "32", "--steps", "1"]))
        for seed, (what, workers, reference, options) in enumerate(runs):
            command = [*orch_command(), "run", "--quiet", *towers, *options, "--checkpoint-every", "0",
                       "--seed", str(seed)]
            peak, wall = peak_rss(command, folder)
            results.append({"what": what, "workers": workers, "peak_rss_bytes": peak, "reference_bytes": reference,
                            "wall_s": wall})
            rows.append([what, workers, peak / 1e9, reference / 1e9, peak / reference, wall])
    print(f"csv of {images} JPEGs of {args.source_size} px decoded at {args.image_size} px; batch {args.batch_size}, "
          f"--grad-cache {args.grad_cache}, {args.steps} steps\n")
    print(table(["run", "workers", "peak RSS GB", "reference GB (fp32 pixels)", "peak / reference", "wall s"], rows))
    write_json(args.json, {**info, "args": vars(args), "images": images, "results": results})


if __name__ == "__main__":
    main()
