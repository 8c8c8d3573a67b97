"""CLIP training throughput: orch's training step against open_clip's, same model sizes, batch and precision.

Measured side by side in one process, on synthetic image-text batches already on the device (no data
loading: this is the training step alone), for CLIP ViT-B/32 and ViT-B/16 (image 224, text context 77;
vision tower 768 wide, 12 layers, 12 heads; text tower 512 wide, 12 layers, 8 heads; embeddings 512):

- ``orch``: the model a run builds (``--encoder vit:...`` ``--text-encoder text-transformer:...`` ``--loss infonce``,
  resolved with ``orchestrator.spec.resolve_run`` and built from the registry), ``engine.scale.prepare`` and
  ``engine.train.make_engine`` (DeepSpeed, ZeRO-0; bf16 as DeepSpeed's ``torch_autocast`` over fp32 weights;
  fused AdamW), then train.py's inner step: ``out = engine(batch)``, ``engine.backward``, ``engine.step``, the
  logged sums, ``run_after_step``; ``orch --compile`` is the same with ``--compile true``;
- ``open_clip``: ``open_clip.create_model('ViT-B-16')`` (no weights), ``open_clip.ClipLoss``, the step of
  ``open_clip_train/train.py`` with ``accum_freq=1``, i.e. its default loop: ``torch.amp.autocast`` bf16, backward,
  grad-norm clipping at the same 1.0, torch ``AdamW`` with open_clip's parameter groups, betas (0.9, 0.98), eps
  1e-6 (not fused, as open_clip creates it), its per-step cosine LR, and the ``logit_scale`` clamp to ln(100);
  ``open_clip --torchcompile`` is the same with open_clip's ``--torchcompile`` (``torch.compile`` of the model).

The towers differ in two known ways: open_clip's text tower has CLIP's 49,408-token BPE embedding (25 M more
parameters for the optimizer; no FLOPs) where orch's has 259 byte tokens (``--tiny`` gives both 259), and
open_clip's attention is ``nn.MultiheadAttention`` where orch's calls SDPA directly. Reported per model:
samples/s per GPU (batch x steps / seconds), each variant's ratio to open_clip's default loop, forward GFLOPs per sample
(``torch.utils.flop_counter``), MFU (samples/s x 3 x forward FLOPs / peak; the peak from a table of bf16 dense
tensor-core figures by device name, or ``--peak-tflops``) and peak memory. Variants are timed in alternating
rounds (orch, open_clip, then reversed) after warmup steps.

open_clip is installed for this benchmark only, not a dependency of orch: ``pip install open_clip_torch``.

    python bench/clip_throughput.py                  # GPU: ViT-B/32 and ViT-B/16, batch 256, bf16, all variants
    python bench/clip_throughput.py --tiny           # CPU smoke test: a tiny model, a few steps (about a minute)
    python bench/clip_throughput.py --models ViT-B-16 --variants orch,open_clip
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from bench._common import free_port, header, median, table, write_json  # noqa: E402

# Dense bf16 tensor-core peaks in TFLOP/s (NVIDIA datasheets), matched in order against the device name.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("A100", 312.0)]
PATCH = {"ViT-B-32": 32, "ViT-B-16": 16}
TEXT_SHAPE = {"width": 512, "depth": 12, "heads": 8, "context_length": 77}
CLIP_VOCAB = 49408  # open_clip's BPE: SOT 49406, EOT 49407 (the largest id: open_clip pools at text.argmax())
TINY = {"image_size": 32, "width": 64, "depth": 2, "heads": 2, "embed_dim": 32, "text_width": 64, "text_depth": 2,
        "text_heads": 2, "context_length": 16, "vocab": 259}  # the vocabulary of orch's byte tokenizer


def shapes(model: str, tiny: bool) -> dict[str, int]:
    """One set of tower shapes, used for both implementations."""
    if tiny:
        return {**TINY, "patch_size": PATCH[model] // 4}
    return {"image_size": 224, "patch_size": PATCH[model], "width": 768, "depth": 12, "heads": 12, "embed_dim": 512,
            "text_width": TEXT_SHAPE["width"], "text_depth": TEXT_SHAPE["depth"], "text_heads": TEXT_SHAPE["heads"],
            "context_length": TEXT_SHAPE["context_length"], "vocab": CLIP_VOCAB}


def peak_tflops(device_name: str, precision: str, override: float | None) -> float | None:
    if override:
        return override
    if precision != "bf16":
        return None
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def synthetic(s: dict[str, int], batch: int, device: Any, seed: int = 0) -> dict[str, Any]:
    """Random pixels and captions of random length (10 to the context), one set for both implementations:
    orch's byte tokens (BOS, bytes, EOS, PAD) and open_clip's ids (SOT, ids, EOT = the largest id, 0)."""
    import torch

    from plugins.encoders.text_transformer import BOS, EOS, PAD

    g = torch.Generator().manual_seed(seed)
    ctx, vocab = s["context_length"], s["vocab"]
    images = torch.randn(batch, 3, s["image_size"], s["image_size"], generator=g)
    lengths = torch.randint(min(10, ctx - 2), ctx - 1, (batch,), generator=g)
    orch_text = torch.full((batch, ctx), PAD, dtype=torch.long)
    clip_text = torch.zeros((batch, ctx), dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        orch_text[i, : n + 2] = torch.cat([torch.tensor([BOS]), torch.randint(0, 256, (n,), generator=g),
                                           torch.tensor([EOS])])
        clip_text[i, : n + 2] = torch.cat([torch.tensor([vocab - 2]), torch.randint(1, vocab - 2, (n,), generator=g),
                                           torch.tensor([vocab - 1])])
    return {"images": images.to(device), "orch_text": orch_text.to(device), "clip_text": clip_text.to(device)}


class Orch:
    """orch's training step, as orchestrator/engine/train.py runs it."""

    def __init__(self, s: dict[str, int], batch: int, precision: str, steps: int, device: Any, data: dict[str, Any],
                 flags: dict[str, str]) -> None:
        import torch

        from orchestrator.engine.compose import RunModel, build_component
        from orchestrator.engine.scale import prepare, run_after_step
        from orchestrator.engine.train import make_engine
        from orchestrator.registry import Registry
        from orchestrator.spec import resolve_run

        registry = Registry.load()
        choices = {
            "encoder": f"vit:image_size={s['image_size']},patch_size={s['patch_size']},width={s['width']},"
                       f"depth={s['depth']},heads={s['heads']},embed_dim={s['embed_dim']},pool=cls,in_channels=3",
            "text_encoder": f"text-transformer:width={s['text_width']},depth={s['text_depth']},heads={s['text_heads']},"
                            f"context_length={s['context_length']},embed_dim={s['embed_dim']},pool=eot",
            "loss": "infonce",
        }
        trainer_raw = {"batch_size": str(batch), "precision": precision, "steps": str(max(steps, 10)), **flags}
        self.spec = resolve_run(registry, choices, trainer_raw)
        self.trainer = self.spec["trainer"]
        # compose.build without the dataset, sampler and evaluators (the batches here are synthetic)
        torch.manual_seed(self.trainer["seed"])
        image = build_component(registry, "encoder", self.spec["encoder"])
        text = build_component(registry, "encoder", self.spec["text_encoder"])
        loss = build_component(registry, "loss", self.spec["loss"])
        self.model = RunModel(image, text, loss, set(registry.get("loss", "infonce").declared.get("needs", ())))
        prepare(self.model, self.trainer, self.spec)
        self.engine, _ = make_engine(self.model, self.trainer, device, precision, world=1)
        self.after_step = lambda: run_after_step(self.model.loss, self.engine.optimizer)
        self.batch = {"image": data["images"], "text": data["orch_text"]}
        self.interval: dict[str, Any] = {}
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def step(self) -> None:
        out = self.engine(self.batch)
        self.engine.backward(out["loss"])
        self.engine.step()
        for key, value in out.items():
            self.interval[key] = self.interval.get(key, 0) + value.detach().float()
        self.after_step()

    def forward(self) -> None:
        self.engine(self.batch)


class OpenClip:
    """open_clip's training step (open_clip_train/train.py, accum_freq=1)."""

    def __init__(self, name: str, s: dict[str, int], tiny: bool, precision: str, steps: int, lr: float,
                 device: Any, data: dict[str, Any], compile_: bool) -> None:
        import open_clip
        import torch
        from open_clip_train.scheduler import cosine_lr

        torch.manual_seed(0)
        if tiny:
            self.model = open_clip.CLIP(
                embed_dim=s["embed_dim"],
                vision_cfg={"image_size": s["image_size"], "patch_size": s["patch_size"], "width": s["width"],
                            "layers": s["depth"], "head_width": s["width"] // s["heads"]},
                text_cfg={"context_length": s["context_length"], "vocab_size": s["vocab"], "width": s["text_width"],
                          "heads": s["text_heads"], "layers": s["text_depth"]}, output_dict=True)
        else:
            self.model = open_clip.create_model(name, output_dict=True)  # as open_clip_train/main.py
        self.model.to(device)
        self.loss = open_clip.ClipLoss()
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        named = list(self.model.named_parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
             {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": 0.1}],
            lr=lr, betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = cosine_lr(self.optimizer, lr, max(1, steps // 10), max(steps, 10))
        self.forward_model = torch.compile(self.model) if compile_ else self.model
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.autocast = (lambda: torch.amp.autocast(device.type, dtype=dtype)) if dtype else _null
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.images, self.text = data["images"], data["clip_text"]
        self.n = 0
        self.parameters = sum(p.numel() for p in self.model.parameters())

    def step(self) -> None:
        import torch

        self.scheduler(self.n)
        self.n += 1
        self.optimizer.zero_grad()
        with self.autocast():
            out = self.forward_model(self.images, self.text)
            total = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        if self.scaler:
            self.scaler.scale(total).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, norm_type=2.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            total.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, norm_type=2.0)
            self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))

    def forward(self) -> None:
        with self.autocast():
            self.forward_model(self.images, self.text)


class _null:  # noqa: N801 - a context manager that does nothing, like contextlib.suppress() in open_clip
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def forward_gflops(forward: Callable[[], None], batch: int) -> float:
    """Forward GFLOPs per sample, counted by torch (matmuls, convolutions, attention) on the eager forward: a
    compiled variant is compiled by its first training step, not here under a dispatch mode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        forward()
    return counter.get_total_flops() / batch / 1e9


# Each variant's settings: orch's are trainer flags of the run, open_clip's whether it compiles. orch-zero2-overlap is
# what ZeRO-2 with DeepSpeed's overlapped bucket reduction (the multi-GPU alternative to ZeRO-0's reduction after the
# backward pass) costs on one GPU.
VARIANTS = {"orch": ("orch", {}), "orch-compile": ("orch", {"compile": "true"}),
            "orch-zero2-overlap": ("orch", {"zero": "2", "deepspeed": "zero_optimization.overlap_comm=true"}),
            "open_clip": ("open_clip", {}), "open_clip-compile": ("open_clip", {"compile": True})}
LABELS = {"orch": "orch", "orch-compile": "orch --compile",
          "orch-zero2-overlap": "orch --zero 2 --deepspeed zero_optimization.overlap_comm=true",
          "open_clip": "open_clip (default loop)", "open_clip-compile": "open_clip --torchcompile"}
BASELINE = "open_clip"


def measure(name: str, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch
    from torch._dynamo.utils import counters

    s = shapes(name, args.tiny)
    data = synthetic(s, args.batch_size, device)
    total_steps = args.warmup + args.rounds * args.steps_per_round
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    variants: dict[str, Any] = {}
    for key in args.variants:
        kind, settings = VARIANTS[key]
        if kind == "orch":
            variants[key] = Orch(s, args.batch_size, args.precision, total_steps, device, data, settings)
        else:
            variants[key] = OpenClip(name, s, args.tiny, args.precision, total_steps, 1e-3, device, data,
                                     settings.get("compile", False))
    flops = {k: forward_gflops(v.forward, args.batch_size) for k, v in variants.items()}
    memory: dict[str, float] = {}
    for key, variant in variants.items():  # warmup also compiles; memory: what its steps add to what is held
        sync()
        if cuda:
            held = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        for _ in range(args.warmup):
            variant.step()
        sync()
        print(f"{name} {LABELS[key]}: {args.warmup} warmup steps in {time.perf_counter() - began:.1f} s "
              f"(graphs compiled so far: {counters['stats']['unique_graphs']})", flush=True)
        if cuda:
            memory[key] = (torch.cuda.max_memory_allocated(device) - held) / 2**30
    rounds = []
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(variants)[::-1]
        times = {}
        for key in order:
            sync()
            began = time.perf_counter()
            for _ in range(args.steps_per_round):
                variants[key].step()
            sync()
            times[key] = time.perf_counter() - began
        rounds.append(times)
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_tflops(device_name, args.precision, args.peak_tflops)
    result: dict[str, Any] = {"model": name + (" (tiny)" if args.tiny else ""), "shapes": s, "device": device_name,
                              "precision": args.precision, "batch_size": args.batch_size, "peak_tflops": peak,
                              "rounds": rounds, "variants": {}}
    n = args.rounds * args.steps_per_round * args.batch_size
    for key, variant in variants.items():
        rate = n / sum(t[key] for t in rounds)
        result["variants"][key] = {
            "label": LABELS[key], "samples_per_s": rate, "forward_gflops_per_sample": flops[key],
            "parameters": variant.parameters, "mfu": rate * 3 * flops[key] * 1e9 / (peak * 1e12) if peak else None,
            "step_memory_gib": memory.get(key)}
    if BASELINE in variants:
        base = result["variants"][BASELINE]["samples_per_s"]
        for key, figures in result["variants"].items():
            figures["vs_open_clip"] = figures["samples_per_s"] / base
            figures["median_round_vs_open_clip"] = median([t[BASELINE] / t[key] for t in rounds])
    del variants
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/clip_throughput.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and a few steps: the CPU smoke test")
    parser.add_argument("--models", default="ViT-B-32,ViT-B-16", help="comma-separated (default both)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default all on a GPU; orch,open_clip tiny)")
    parser.add_argument("--batch-size", type=int, default=None, help="per GPU (default 256; 8 with --tiny)")
    parser.add_argument("--precision", default=None, choices=["bf16", "fp32", "fp16"],
                        help="default bf16 on a GPU, fp32 on the CPU")
    parser.add_argument("--warmup", type=int, default=None, help="steps of each before timing (default 10; 1 tiny)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating timed rounds (default 6; 2 tiny)")
    parser.add_argument("--steps-per-round", type=int, default=None, help="default 10; 2 with --tiny")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: from the GPU's name)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.variants is None:
        args.variants = "orch,open_clip" if args.tiny else ",".join(VARIANTS)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")

    info = header("bench/clip_throughput.py: orch's CLIP training step vs open_clip's")
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())})
    try:
        import open_clip  # noqa: F401
    except ImportError:
        print("open_clip is not installed: `pip install open_clip_torch` (for this benchmark only)", file=sys.stderr)
        return 2
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("no CUDA GPU: the CLIP sizes would take hours on the CPU; run with --tiny for the smoke test",
              file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    defaults = {"batch_size": (256, 8), "warmup": (10, 1), "rounds": (6, 2), "steps_per_round": (10, 2)}
    for key, (full, tiny) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    if args.precision is None:
        args.precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"

    results = [measure(name.strip(), args, device) for name in args.models.split(",") if name.strip()]
    print()
    print(table(["model", "variant", "device", "precision", "batch", "samples/s", "vs open_clip",
                 "median round vs open_clip", "MFU", "fwd GFLOP/sample", "params M", "step memory GiB"],
                [[r["model"], v["label"], r["device"], r["precision"], r["batch_size"], v["samples_per_s"],
                  v.get("vs_open_clip", "n/a"), v.get("median_round_vs_open_clip", "n/a"), _pct(v["mfu"]),
                  f"{v['forward_gflops_per_sample']:.4g}", f"{v['parameters'] / 1e6:.1f}",
                  "n/a" if v["step_memory_gib"] is None else f"{v['step_memory_gib']:.1f}"]
                 for r in results for v in r["variants"].values()]))
    write_json(args.json, {**info, "results": results})
    return 0


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


if __name__ == "__main__":
    sys.exit(main())
