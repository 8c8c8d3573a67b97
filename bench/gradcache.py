"""Gradient caching: peak memory and samples/s of one large contrastive batch, with and without GradCache
(Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup").

Each configuration (no caching, then ``--grad-cache`` with each chunk size) runs in its own subprocess, which
builds the run's components as orch does (``resolve_run``, ``compose.build``, ``train.make_engine``: the
DeepSpeed engine) and trains ``--steps`` steps of one synthetic batch of ``--batch-size`` image-text pairs after
``--warmup`` steps, through exactly train.py's step: ``engine(batch); engine.backward(loss)`` or
``gradcache.engine_cached_step``, then ``engine.step()``. Peak memory: on CUDA ``torch.cuda.max_memory_allocated``
of the measured steps; on the CPU the process's peak resident set (``ru_maxrss``), reported whole and above the
resident set before the first step (the model, its optimizer state and the batch; what the steps add on top is
mostly activations). tracemalloc would not see torch's allocations. The first step's loss of every
configuration is printed too: caching changes memory and time, not the loss. Throughput is the median over
the timed steps, by wall clock and by the process's CPU time (steadier on a shared machine).

With several ``--loss`` (e.g. ``infonce`` and ``infonce:tile=1024``, the loss computed tile by tile, Inf-CL),
every loss runs every configuration; ratios are against the first loss without caching (or, with ``--skip-off``,
its first chunk size).

    python bench/gradcache.py                                      # 4096 pairs, chunks 1024 and 256, CPU
    python bench/gradcache.py --batch-size 1024 --chunks 256 --steps 1 --warmup 1
    python bench/gradcache.py --batch-size 16384 --chunks 1024 --loss infonce --loss infonce:tile=1024
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from bench._common import free_port, header, int_list, table, write_json  # noqa: E402

SMALL_VIT = "vit:width=64,depth=2,heads=2,embed_dim=64"
SMALL_TEXT = "text-transformer:width=64,depth=2,heads=2,embed_dim=64"


def synthetic_images(shape: tuple[int, ...], distinct: int, seed: int = 0) -> Any:
    """A batch of uniform [-1, 1) pixels of ``shape``: the first ``distinct`` images drawn (0: all), repeated through
    the rest. torch draws a seeded tensor on one core: 0.6 ms a 224 x 224 image on a 2-core Xeon, 40 s for 65,536
    (40 GB), where copying them took 0.05 ms an image on its two cores. The pixels' values change neither the
    memory nor the time of a step."""
    import torch

    images = torch.empty(shape)
    distinct = min(distinct or len(images), len(images))
    images[:distinct].uniform_(-1, 1, generator=torch.Generator().manual_seed(seed))
    for start in range(distinct, len(images), distinct):
        images[start:start + distinct] = images[:min(distinct, len(images) - start)]
    return images


def child(config: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this process: build, warm up, time, and read the peak memory."""
    began = time.perf_counter()  # setup_s: the imports, the build and the batch
    import resource

    import torch

    from orchestrator.engine.compose import build
    from orchestrator.engine.dsconfig import effective_precision
    from orchestrator.engine.gradcache import engine_cached_step
    from orchestrator.engine.train import make_engine
    from orchestrator.registry import Registry
    from orchestrator.spec import resolve_run

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    registry = Registry.load()
    trainer_raw = {"batch_size": str(config["batch_size"]), "grad_cache": str(config["chunk"]), "steps": "100"}
    components = {"encoder": config["encoder"], "text_encoder": config["text_encoder"], "loss": config["loss"]}
    spec = resolve_run(registry, components, trainer_raw)
    trainer = spec["trainer"]
    precision = effective_precision(trainer["precision"], device.type,
                                    device.type == "cuda" and torch.cuda.is_bf16_supported())
    model = build(registry, spec).model.to(device)
    engine, _ = make_engine(model, trainer, device, precision, world=1)
    n = config["batch_size"]
    image_encoder = model.image_encoder
    chunk = config["chunk"]
    # as train.py: with caching the batch stays in host memory, each chunk pinned and copied as it is encoded
    shape = (n, image_encoder.in_channels, image_encoder.image_size, image_encoder.image_size)
    batch_began = time.perf_counter()
    batch = {
        "image": synthetic_images(shape, config["distinct_images"]),  # 40 GB at 65,536
        "text": model.text_tower.tokenize([f"a photo of the digit {i % 10}" for i in range(n)]),
    }
    batch = batch if chunk else {k: v.to(device) for k, v in batch.items()}
    batch_s = time.perf_counter() - batch_began

    def step() -> float:
        if chunk:
            out = engine_cached_step(engine, batch, chunk)
        else:
            out = engine(batch)
            engine.backward(out["loss"])
        engine.step()
        model.loss.after_step()
        return out["loss"].detach().float().item()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first_loss = step()
    for _ in range(config["warmup"] - 1):
        step()
    sync()
    walls, cpus = [], []
    for _ in range(config["steps"]):
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        sync()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"loss": config["loss"], "chunk": chunk, "first_loss": first_loss,
              "samples_per_s": n / statistics.median(walls), "samples_per_cpu_s": n / statistics.median(cpus),
              "step_wall_s": walls, "step_cpu_s": cpus,
              "peak_rss_mb": peak_kb / 1024, "rss_before_mb": before_kb / 1024,
              "step_rss_mb": (peak_kb - before_kb) / 1024, "batch_s": batch_s,
              "setup_s": batch_began + batch_s - began}
    if device.type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        result["device"] = torch.cuda.get_device_name(device)
    return result


def run_child(config: dict[str, Any]) -> dict[str, Any]:
    """One configuration in a subprocess. Running out of GPU memory is a result (the batch does not fit that way),
    reported as such; any other failure stops the benchmark."""
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode and "OutOfMemoryError" in proc.stderr:
        return {"loss": config["loss"], "chunk": config["chunk"], "error": "out of GPU memory"}
    if proc.returncode or not lines:
        raise SystemExit(f"configuration {config} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4096, help="the (micro-)batch of one step")
    parser.add_argument("--chunks", type=int_list, default=[1024, 256], help="GradCache chunk sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--skip-off", action="store_true",
                        help="do not run the uncached step (for a batch known not to fit without caching)")
    parser.add_argument("--loss", action="append", default=None,
                        help="loss spec, repeat to compare (default infonce)")
    parser.add_argument("--encoder", default=SMALL_VIT)
    parser.add_argument("--text-encoder", default=SMALL_TEXT)
    parser.add_argument("--distinct-images", type=int, default=0,
                        help="draw this many synthetic images and repeat them through the batch (0: every image its "
                             "own; drawing 65,536 224 x 224 images takes a host core 40 s or more)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads in each configuration (0: torch's default); 1 makes CPU figures "
                             "on a busy machine steadier")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.distinct_images < 0:
        parser.error("--distinct-images must be 0 (every image its own) or more")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    losses = args.loss or ["infonce"]
    info = header("gradient caching: peak memory and throughput of one large contrastive batch")
    base = {"device": device, "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
            "encoder": args.encoder, "text_encoder": args.text_encoder, "threads": args.threads,
            "distinct_images": args.distinct_images}
    print(f"batch {args.batch_size} pairs, {args.encoder} + {args.text_encoder}, losses {', '.join(losses)}, "
          f"{device}, {args.warmup} warmup + {args.steps} timed steps per configuration, one subprocess each\n",
          flush=True)
    results = []
    for loss in losses:
        for chunk in [*([] if args.skip_off else [0]), *args.chunks]:
            results.append(run_child({**base, "loss": loss, "chunk": chunk}))
            print(f"  {loss}, chunk {chunk or 'off'}: {results[-1]}", flush=True)
    baseline = results[0]
    gpu = device == "cuda"
    rows = []
    for r in results:
        label = [r["loss"], "off" if not r["chunk"] else r["chunk"]]
        if "error" in r:
            rows.append([*label, r["error"], *["n/a"] * (8 + gpu)])
            continue
        memory_key = "peak_gpu_mb" if gpu else "step_rss_mb"
        vs = {k: "n/a" if "error" in baseline else r[k] / baseline[k]
              for k in (memory_key, "samples_per_s", "samples_per_cpu_s")}
        rows.append([*label, "ok", *([r["peak_gpu_mb"]] if gpu else []), r["peak_rss_mb"], r["step_rss_mb"],
                     vs[memory_key], r["samples_per_s"], vs["samples_per_s"], r["samples_per_cpu_s"],
                     vs["samples_per_cpu_s"], f"{r['first_loss']:.6f}"])
    ratio = f"vs {baseline['loss']} {'off' if not baseline['chunk'] else baseline['chunk']}"
    headers = ["loss", "grad cache chunk", "result", *(["peak GPU MB"] if gpu else []), "peak RSS MB",
               "RSS added by steps MB", f"memory {ratio}", "samples/s (wall)", ratio, "samples per CPU s", ratio,
               "first loss"]
    print()
    print(table(headers, rows))
    write_json(args.json, {**info, "config": {**base, "losses": losses}, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
