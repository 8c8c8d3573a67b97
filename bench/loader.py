"""How fast orch's input pipeline delivers image-text batches, against open_clip's data path, side by side.

For each source image size, the script writes the same photo-like JPEGs (smooth colour fields plus pixel
noise, quality 90: 3 MP comes out near 1.2 MB, as camera photos do) twice: as WebDataset tar shards and as a
CSV of files. It then times whole passes over them, alternating rounds:

- orch: the training loader of ``engine/train.py`` (``make_loader``) over the ``webdataset`` or ``csv``
  dataset plugin at ``image_size`` 224, with the ViT's transform and the text tower's tokenizer;
- open_clip: open_clip's data path rebuilt with the same libraries (``open_clip/training/data.py``): for
  shards, a ``webdataset`` pipeline (``decode("pilrgb")``, the image transform, per-sample tokenization,
  ``batched``) in a ``WebLoader``; for a CSV, its ``CsvDataset`` in a ``DataLoader``. The image transform
  is open_clip's training one (``RandomResizedCrop(224, scale=(0.9, 1.0))`` bicubic, ``ToTensor``,
  ``Normalize``) on the fully decoded image. Both sides tokenize with orch's tokenizer.

Reported per format, size and ``--workers``: samples/s of each and orch/open_clip, and how many loader
workers would feed ``--feed`` samples/s (default 2,593: ViT-B/16 compiled on one H100, bench/RESULTS.md).
No GPU is involved: this is the host's share of a step.

    python bench/loader.py                                   # 256x256, 640x480, 2000x1500; workers 0,1,2
    python bench/loader.py --sizes 4000x3000 --images 64 --workers 1
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from bench._common import header, int_list, median, str_list, table, write_json  # noqa: E402

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's constants.py
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """A JPEG that compresses like a photo: a smooth colour field (detail at 1/8 scale) plus pixel noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8))
    pixels = np.asarray(field.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    pixels = (pixels + rng.integers(-12, 13, pixels.shape)).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_data(folder: Path, width: int, height: int, count: int, shard_size: int) -> tuple[str, str, Path, int]:
    """``count`` training images plus one to hold out, as tar shards and as files listed in a CSV. Returns the
    shard pattern with the held-out shard (orch's, whose held-out split is the last sample), the pattern without
    it (open_clip's), the CSV and the mean JPEG size in bytes."""
    import webdataset as wds

    (folder / "images").mkdir(parents=True)
    bounds = [*range(0, count, shard_size), count, count + 1]  # the last shard holds the held-out image alone
    rows, total = [], 0
    for s, (start, end) in enumerate(zip(bounds, bounds[1:])):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(start, end):
                data, text = photo_jpeg(width, height, seed=i), f"a photo of item {i} on a table."
                sink.write({"__key__": f"{i:06d}", "jpg": data, "txt": text})
                (folder / "images" / f"{i:06d}.jpg").write_bytes(data)
                rows.append((f"images/{i:06d}.jpg", text))
                total += len(data)
    with open(folder / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(rows)
    last = len(bounds) - 2
    return (f"{folder}/{{00000..{last:05d}}}.tar", f"{folder}/{{00000..{last - 1:05d}}}.tar", folder / "pairs.csv",
            total // len(rows))


def orch_loader(data: str, batch_size: int, workers: int, prefetch: int) -> tuple[Any, Any, int]:
    """orch's training loader (``make_loader``) over the dataset plugin, set to one pass over the first ``n``
    training samples; the run's tokenizer; ``n``."""
    import torch

    from orchestrator.engine.compose import build
    from orchestrator.engine.train import make_loader
    from orchestrator.registry import Registry
    from orchestrator.spec import resolve_run

    registry = Registry.load()
    spec = resolve_run(registry, {"data": data, "encoder": "vit:image_size=224,patch_size=16", "eval": []},
                       {"batch_size": str(batch_size), "workers": str(workers), "prefetch": str(prefetch)})
    comp = build(registry, spec)
    shards, loader = make_loader(comp.dataset.train, comp.model, spec["trainer"], 0, torch.device("cpu"))
    n = len(comp.dataset.train) // batch_size * batch_size
    shards.batches = [[(0, i) for i in range(b, b + batch_size)] for b in range(0, n, batch_size)]
    return loader, comp.model.text_tower.tokenize, n


def open_clip_transform() -> Any:
    """open_clip's training image transform (``image_transform(224, is_train=True)``, no extra augmentation)."""
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      lambda image: image.convert("RGB"), T.ToTensor(), T.Normalize(OPENAI_MEAN, OPENAI_STD)])


class CsvDataset:
    """open_clip's ``CsvDataset``: the image through the transform, the caption tokenized, per sample."""

    def __init__(self, table_path: Path, transform: Any, tokenize: Any, count: int) -> None:
        with open(table_path, newline="") as f:
            rows = list(csv.DictReader(f))[:count]
        self.images = [table_path.parent / r["image"] for r in rows]
        self.captions = [r["caption"] for r in rows]
        self.transform, self.tokenize = transform, tokenize

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        from PIL import Image

        return self.transform(Image.open(self.images[i])), self.tokenize([self.captions[i]])[0]


def open_clip_loader(fmt: str, shards: str, table_path: Path, tokenize: Any, count: int, batch_size: int,
                     workers: int, prefetch: int) -> Any:
    """open_clip's loader of the same data (``get_wds_dataset`` / ``get_csv_dataset``, no shuffling)."""
    import torch
    import webdataset as wds

    transform = open_clip_transform()
    options = {"num_workers": workers, "persistent_workers": workers > 0}
    if workers:
        options["prefetch_factor"] = prefetch
    if fmt == "csv":
        return torch.utils.data.DataLoader(CsvDataset(table_path, transform, tokenize, count), batch_size=batch_size,
                                           drop_last=True, **options)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards), wds.split_by_worker, wds.tarfile_to_samples(), wds.decode("pilrgb"),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.map_dict(image=transform, text=lambda text: tokenize([text])[0]),
        wds.to_tuple("image", "text"), wds.batched(batch_size, partial=False))
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, **options)


def passes(loader: Any, count: int) -> tuple[int, float, tuple[int, ...]]:
    """Samples delivered by ``count`` passes over the loader, the seconds they took, and a batch's image shape."""
    start, samples, shape = time.perf_counter(), 0, ()
    for _ in range(count):
        for batch in loader:
            images = batch["image"] if isinstance(batch, dict) else batch[0]
            samples, shape = samples + len(images), tuple(images.shape)
    return samples, time.perf_counter() - start, shape


def measure(fmt: str, data: tuple[str, str, Path], workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """Both loaders over the same training samples: a warm-up pass each, then alternating rounds."""
    import torch

    torch.set_num_threads(1)  # a loader worker's setting; the main process loads alone at --workers 0
    orch_shards, open_clip_shards, table_path = data
    held_out = f"test_fraction={0.5 / (args.images + 1)}"  # one sample: the last
    spec = f"webdataset:shards={orch_shards},image_size=224,{held_out}" if fmt == "webdataset" else \
        f"csv:path={table_path},image_size=224,{held_out}"
    orch, tokenize, n = orch_loader(spec, args.batch_size, workers, args.prefetch)
    loaders = {"orch": orch, "open_clip": open_clip_loader(fmt, open_clip_shards, table_path, tokenize, n,
                                                          args.batch_size, workers, args.prefetch)}
    warm = {name: passes(loader, 1) for name, loader in loaders.items()}  # starts the workers, fills the page cache
    count = max(1, round(args.round_seconds / max(t for _, t, _ in warm.values())))
    results: dict[str, list[tuple[int, float, tuple[int, ...]]]] = {name: [] for name in loaders}
    for r in range(args.rounds):
        for name in (list(loaders) if r % 2 == 0 else list(loaders)[::-1]):
            results[name].append(passes(loaders[name], count))
    rates = {name: sum(s for s, _, _ in rs) / sum(t for _, t, _ in rs) for name, rs in results.items()}
    rounds = [a[0] / a[1] / (b[0] / b[1]) for a, b in zip(results["orch"], results["open_clip"])]
    return {"orch": rates["orch"], "open_clip": rates["open_clip"], "ratio": rates["orch"] / rates["open_clip"],
            "median_round_ratio": median(rounds), "passes_per_round": count,
            "samples_per_pass": {name: warm[name][0] for name in loaders},
            "batch_shape": {name: warm[name][2] for name in loaders}}


def kernel_times(width: int, height: int, repeats: int = 20) -> list[float]:
    """Milliseconds per image (median, one thread) of what ``load_image`` is made of, at output 224: decoding every
    pixel, decoding in draft mode, Pillow's and torch's bicubic resize of the centre square, and ``load_image``."""
    import torch
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    from plugins.datasets.imagefolder import load_image

    torch.set_num_threads(1)
    data = photo_jpeg(width, height, seed=0)

    def decode(draft: bool) -> Image.Image:
        img = Image.open(io.BytesIO(data))
        if draft:
            img.draft(None, (448, 448))
        return img.convert("RGB")

    side = min(width, height)
    box = ((width - side) // 2, (height - side) // 2, (width + side) // 2, (height + side) // 2)
    square = decode(False).crop(box)
    pixels = TF.pil_to_tensor(square)
    steps = [lambda: decode(False), lambda: decode(True),
             lambda: square.resize((224, 224), Image.Resampling.BICUBIC),
             lambda: TF.resize(pixels, [224, 224], interpolation=TF.InterpolationMode.BICUBIC, antialias=True),
             lambda: load_image(io.BytesIO(data), 224, "bench")]
    times = []
    for step in steps:
        step()
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            runs.append((time.perf_counter() - start) * 1e3)
        times.append(median(runs))
    return times


INDEX_CHILD = """
import json, os, sys, time, traceback
from plugins.datasets.csv import CSVPairs
from plugins.datasets.webdataset import WebDataset

kind = {"webdataset": WebDataset, "csv": CSVPairs}[sys.argv[1]]
for request in sys.stdin:  # one build: a line of [rank, world size, ranks per machine, cache folder] per process
    go_read, go_write = os.pipe()
    children = []
    for rank, world, local, cache in json.loads(request):
        out_read, out_write = os.pipe()
        if os.fork() == 0:  # a rank: it must never return into this loop, whatever its build raises
            try:
                os.environ.update(ORCH_CACHE_DIR=cache, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=local)
                os.read(go_read, 1)  # every rank forked: they start together
                start = time.perf_counter()
                data = kind(sys.argv[2], image_size=224)
                os.write(out_write, f"{time.perf_counter() - start} {len(data.train) + len(data.test)}".encode())
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        os.close(out_write)
        children.append(out_read)
    os.write(go_write, b"x" * len(children))
    results = [os.read(out, 256).decode().split() for out in children]
    codes = [os.waitstatus_to_exitcode(os.wait()[1]) for _ in children]
    print(json.dumps({"results": results, "codes": codes}), flush=True)
    for fd in (go_read, go_write, *children):
        os.close(fd)
"""


def write_shards(folder: Path, shards: int, per_shard: int) -> str:
    """``shards`` WebDataset shards of ``per_shard`` 64 x 64 photos with captions in ``folder``; their pattern."""
    import webdataset as wds

    folder.mkdir(parents=True)
    image = photo_jpeg(64, 64, seed=0)
    for s in range(shards):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(s * per_shard, (s + 1) * per_shard):
                sink.write({"__key__": f"{i:09d}", "jpg": image, "txt": f"a photo of item {i} on a table.",
                            "json": b"{}"})
    return f"{folder}/{{00000..{shards - 1:05d}}}.tar"


def write_image_files(folder: Path, samples: int) -> Path:
    """``samples`` small JPEG files under ``folder/images`` and ``folder/pairs.csv`` listing them with captions."""
    from PIL import Image

    image = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 120, 150)).save(image, "JPEG")
    rows = []
    for i in range(samples):  # img2dataset's layout: a folder per 10,000 images
        path = folder / "images" / f"{i // 10_000:05d}" / f"{i:09d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image.getvalue())
        rows.append([str(path.relative_to(folder)), f"a photo of item {i} on a table."])
    with open(folder / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"], *rows])
    return folder / "pairs.csv"


def start_up_times(fmt: str, source: str, samples: int, caches: Path) -> dict[str, float]:
    """Seconds to build the ``fmt`` dataset plugin over ``source`` (what every rank does at the start of every
    attempt; webdataset indexes every shard, csv checks every image): one process with an empty cache (what every
    rank paid on every attempt before the cache) and with a full one; two ranks started together on an empty cache,
    as if both were rank 0 (each does all the work) and as ranks 0 and 1 of 2 (each starts at its own half and takes
    what the other has cached); and four ranks as two machines of two with a cache folder each (every machine does
    the whole list), the ranks told which machine they are on (``LOCAL_WORLD_SIZE``, as torchrun and DeepSpeed's
    launcher tell them) or not. Each process of a build is a fork of one interpreter that has imported the plugins
    and done nothing else: a fresh interpreter after its imports, without importing torch for every one."""
    import json
    import subprocess

    template = subprocess.Popen([sys.executable, "-c", INDEX_CHILD, fmt, source], text=True, cwd=_BENCH.parent,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def build(ranks: list[tuple[int, int, str, Path]]) -> float:
        """``ranks``: (rank, world size, ranks per machine or "" when not told, cache folder) of each process."""
        template.stdin.write(json.dumps([[r, w, local, str(cache)] for r, w, local, cache in ranks]) + "\n")
        template.stdin.flush()
        reply = template.stdout.readline()
        outputs = json.loads(reply)["results"] if reply else []
        if not reply or any(json.loads(reply)["codes"]) or any(int(n) != samples for _, n in outputs):
            raise SystemExit(f"{fmt} start-up failed: {reply or 'no reply'}")
        return max(float(seconds) for seconds, _ in outputs)

    def machines(told: str, name: str) -> list[tuple[int, int, str, Path]]:
        return [(rank, 4, told, caches / f"{name}-{rank // 2}") for rank in range(4)]

    try:
        return {"one process, empty cache": build([(0, 1, "", caches / "1")]),
                "one process, cached": build([(0, 1, "", caches / "1")]),
                "2 ranks, empty cache, both from the start": build([(0, 1, "", caches / "2"),
                                                                     (0, 1, "", caches / "2")]),
                "2 ranks, empty cache, rank 1 from the middle": build([(0, 2, "", caches / "3"),
                                                                        (1, 2, "", caches / "3")]),
                "2 machines of 2 ranks, a cache each, not told their machine": build(machines("", "4")),
                "2 machines of 2 ranks, a cache each, told": build(machines("2", "5"))}
    finally:
        template.stdin.close()
        template.wait()


MEMORY_CHILD = """
import gc, json, os, sys, time, tracemalloc
from pathlib import Path
import torch
import plugins.datasets.imagefolder, plugins.datasets.webdataset
from plugins.datasets.csv import CSVPairs
from plugins.datasets.imagefolder import ImageFolder
from plugins.datasets.webdataset import WebDataset

def private_dirty():
    lines = Path("/proc/self/smaps_rollup").read_text().splitlines()
    return next(int(line.split()[1]) * 1024 for line in lines if line.startswith("Private_Dirty:"))

def copied_in_a_fork(work):
    read, write = os.pipe()
    if os.fork() == 0:
        before = private_dirty()
        work()
        os.write(write, str(private_dirty() - before).encode())
        os._exit(0)
    os.wait()
    os.close(write)
    return int(os.read(read, 64))

def build():
    kind = {"webdataset": WebDataset, "csv": CSVPairs, "imagefolder": ImageFolder}[sys.argv[1]]
    return kind(sys.argv[2], image_size=224)

start = time.perf_counter()
build()  # the first build: it indexes the shards, or checks every image
first = time.perf_counter() - start
build()  # lazy imports done: the builds below are a rank's usual one
start = time.perf_counter()
build()
seconds = time.perf_counter() - start
gc.collect()
gc_without = copied_in_a_fork(gc.collect)
tracemalloc.start()
data = build()
held = tracemalloc.get_traced_memory()[0]
tracemalloc.stop()
gc.collect()
image = torch.zeros(3, 224, 224)
plugins.datasets.webdataset.load_image = plugins.datasets.imagefolder.load_image = lambda *a, **k: image

def read_every_sample():
    for i in range(len(data.train)):
        data.train[i]

print(json.dumps({"samples": len(data.train) + len(data.test), "train": len(data.train), "first_seconds": first,
                  "seconds": seconds, "held": held,
                  "read": copied_in_a_fork(read_every_sample), "gc": copied_in_a_fork(gc.collect),
                  "gc_without": gc_without}))
"""


def index_memory(folder: Path, pattern: str, pairs: Path) -> list[dict[str, Any]]:
    """What a dataset's index costs a rank and its loader workers, for the webdataset shards ``pattern``, and for
    the image files of ``pairs`` (``write_image_files``) as a CSV and as an ImageFolder tree: the time of the
    first build (on an empty cache of its own) and of a later one, the bytes a build holds
    (tracemalloc), the bytes a forked worker copies from its rank by reading every training sample once
    (``Private_Dirty``; image decoding replaced by a constant so that only the index is read), and what one
    full garbage collection in a worker copies, with the dataset and without it. Each format in a fresh
    interpreter."""
    import json
    import subprocess

    results = []
    for fmt, source in (("webdataset", pattern), ("csv", str(pairs)), ("imagefolder", str(pairs.parent / "images"))):
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, fmt, source], cwd=_BENCH.parent, text=True,
                             capture_output=True, env={**os.environ, "ORCH_CACHE_DIR": str(folder / f"cache-{fmt}")})
        if out.returncode:
            raise SystemExit(f"index memory ({fmt}) failed: {out.stderr}")
        results.append({"format": fmt, **json.loads(out.stdout.splitlines()[-1])})
    return results


COLUMNS = ["format", "source", "JPEG KB", "workers", "orch samples/s", "open_clip samples/s", "orch/open_clip",
           "median round"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=str_list, default=["256x256", "640x480", "2000x1500"],
                        help="source image sizes, WIDTHxHEIGHT (img2dataset's 256; COCO; a 3 MP photo)")
    parser.add_argument("--images", type=int, default=256, help="training images per size")
    parser.add_argument("--formats", type=str_list, default=["webdataset", "csv"])
    parser.add_argument("--workers", type=int_list, default=[0, 1, 2], help="loader processes (0: the main one)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per variant, after a warm-up pass")
    parser.add_argument("--round-seconds", type=float, default=2.0, help="passes per round: about this long")
    parser.add_argument("--feed", type=float, default=2593.0,
                        help="a GPU step rate to feed, samples/s (default: ViT-B/16 compiled, one H100)")
    parser.add_argument("--index-shards", type=int, default=16,
                        help="shards for the start-up measurements (webdataset indexing, and csv image checks of "
                             "as many files; 0: skip them)")
    parser.add_argument("--index-per-shard", type=int, default=2000, help="samples per shard for the start-up")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.images % args.batch_size:
        parser.error("--images must be a multiple of --batch-size: both loaders then deliver every image")
    info = header("loader: orch's input pipeline vs open_clip's data path")
    print(f"{args.images} JPEGs per size, batch {args.batch_size}, prefetch {args.prefetch}, {args.rounds} rounds "
          f"of ~{args.round_seconds:g} s after a warm-up pass; output 224 x 224\n")
    kernels = [[size, *kernel_times(*(int(x) for x in size.lower().split("x")))] for size in args.sizes]
    print(table(["source", "decode ms", "draft decode ms", "Pillow resize ms", "torch resize ms", "load_image ms"],
                kernels) + "\n", flush=True)
    columns = [*COLUMNS, f"workers for {args.feed:,.0f}/s"]
    rows, records = [], []
    with tempfile.TemporaryDirectory(prefix="orch-loader-") as tmp:
        os.environ["ORCH_CACHE_DIR"] = f"{tmp}/cache"  # the shards' indexes die with them, not in ~/.cache
        index, memory = {}, []
        if args.index_shards:
            samples, folder = args.index_shards * args.index_per_shard, Path(tmp) / "index"
            pattern = write_shards(folder / "shards", args.index_shards, args.index_per_shard)
            pairs = write_image_files(folder / "files", samples)
            for fmt, source in (("webdataset", pattern), ("csv", str(pairs))):
                index[fmt] = start_up_times(fmt, source, samples, folder / f"start-up-{fmt}")
                print(table([f"{fmt} start-up", "samples", "seconds", "us per sample"],
                            [[what, samples, seconds, seconds / samples * 1e6]
                             for what, seconds in index[fmt].items()]) + "\n", flush=True)
            if Path("/proc/self/smaps_rollup").exists():
                memory = index_memory(folder, pattern, pairs)
                print(table(["index", "samples", "first build us/sample", "build us/sample", "held B/sample",
                             "a worker copies reading every sample, B/sample",
                             "gc.collect() in a worker copies, MiB", "without the dataset, MiB"],
                            [[m["format"], m["samples"], m["first_seconds"] / m["samples"] * 1e6,
                              m["seconds"] / m["samples"] * 1e6, m["held"] / m["samples"],
                              m["read"] / m["train"], m["gc"] / 2**20, m["gc_without"] / 2**20] for m in memory])
                      + "\n", flush=True)
        for size in args.sizes:
            width, height = (int(x) for x in size.lower().split("x"))
            *data, mean_bytes = write_data(Path(tmp) / size, width, height, args.images, args.shard_size)
            for fmt in args.formats:
                for workers in args.workers:
                    m = measure(fmt, tuple(data), workers, args)
                    feed = args.feed / m["orch"] * max(workers, 1)  # at this rate per loading process
                    records.append({"format": fmt, "size": size, "jpeg_kb": mean_bytes / 1024, "workers": workers,
                                    **m, "workers_to_feed": feed})
                    rows.append([fmt, size, f"{mean_bytes / 1024:.0f}", workers, m["orch"], m["open_clip"],
                                 m["ratio"], m["median_round_ratio"], f"{feed:.1f}"])
                    print(table(columns, rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(columns, rows))
    write_json(args.json, {**info, "args": vars(args), "results": records, "index_seconds": index,
                           "index_memory": memory,
                           "kernel_ms": [dict(zip(["source", "decode", "draft_decode", "pillow_resize", "torch_resize",
                                                   "load_image"], k)) for k in kernels]})


if __name__ == "__main__":
    main()
