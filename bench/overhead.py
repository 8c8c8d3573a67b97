"""Engine overhead: one orch training step (the DeepSpeed engine path of orchestrator/engine/train.py) against
a hand-written PyTorch step with the same model, loss, optimizer, schedule and batch.

The components of the default spec (or of the choices given) are built twice with the same seed
(``Registry.load()``, ``orchestrator.spec.resolve_run``, ``orchestrator.engine.compose.build``), one
fixed pre-collated batch is put on the device, and:

- orch step: exactly train.py's inner loop: ``deepspeed.initialize`` with
  ``orchestrator.engine.dsconfig.deepspeed_config`` and train.py's AdamW parameter groups, then
  ``out = engine(batch)``, ``engine.backward(out["loss"])``, ``engine.step()``, the per-step sums of the
  logged scalars, ``loss.after_step()``, the per-step stop check (``StopAsked``, and ``StopVote`` of a lone
  rank; ``bench/stop_vote.py`` measures the vote between ranks);
- hand step: ``model(batch)["loss"].backward()``, ``clip_grad_norm_``, ``AdamW.step()``, an equivalent
  ``LambdaLR`` schedule step, ``zero_grad()``, ``loss.after_step()`` (with ``torch.autocast`` in bf16/fp16
  when the run's precision is not fp32, as in an AMP loop; on the GPU the optimizer is fused, as train.py's).

Warmup steps are excluded; the variants are measured in alternating rounds (orch, hand, ..., then the
reverse order) to cancel drift.
Reported per device (CPU, and CUDA when available): steps/s of each, the ratio orch/hand (of the totals,
and the median of the per-round ratios), target >= 0.97, the bitwise agreement of the first step's loss,
and a per-phase breakdown (forward, backward, optimizer step) from a separate pass. When the ratio is
under target (or with ``--profile``) cProfile shows where the orch step spends the time.

    python bench/overhead.py                                  # default spec, CPU (+ GPU when present)
    python bench/overhead.py --batch-size 32 --rounds 3 --steps-per-round 3 --warmup 2
"""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
sys.path.insert(0, str(_BENCH.parent))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import cProfile  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

from bench._common import free_port, header, median, table, write_json  # noqa: E402


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Steps:
    """The two steps, built from one resolved spec on one device."""

    def __init__(self, spec: dict[str, Any], registry: Any, device: Any) -> None:
        import torch

        from orchestrator.engine.compose import build
        from orchestrator.engine.dsconfig import effective_precision, warmup_cosine
        from orchestrator.engine.train import StopAsked, StopVote, _add_to_interval, _collate, make_engine

        trainer = spec["trainer"]
        self.device, self.trainer = device, trainer
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.precision = effective_precision(trainer["precision"], device.type, bf16)
        fused = device.type == "cuda"

        comp = build(registry, spec)
        samples = [(i, comp.dataset.train[i]) for i in range(trainer["batch_size"])]
        batch = _collate(samples, comp.model, seed=trainer["seed"], epoch=0)
        self.batch = {k: v.to(device) for k, v in batch.items()}

        # orch: the engine orchestrator/engine/train.py trains with
        self.orch_model = comp.model
        self.engine, _ = make_engine(self.orch_model, trainer, device, self.precision, world=1)
        self.interval: dict[str, Any] = {}
        self.add_to_interval = _add_to_interval
        self.votes = StopVote(device, world=1)
        self.stop_asked = StopAsked(Path(tempfile.mkdtemp(prefix="orch-overhead-")) / "attempt-1.stop")  # never made

        # hand: the same components, built again from the same seed
        self.hand_model = build(registry, spec).model.to(device)
        self.hand_params = [p for p in self.hand_model.parameters() if p.requires_grad]
        self.hand_opt = torch.optim.AdamW(param_groups(self.hand_model, trainer["weight_decay"]), lr=trainer["lr"],
                                          betas=(0.9, 0.98), eps=1e-6, fused=fused)
        self.hand_sched = torch.optim.lr_scheduler.LambdaLR(self.hand_opt,
                                                            warmup_cosine(trainer["warmup"], trainer["steps"]))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None

    def orch_step(self, phase: Callable[[str], None] = lambda _: None) -> Any:
        out = self.engine(self.batch)
        phase("forward")
        self.engine.backward(out["loss"])
        phase("backward")
        self.engine.step()
        self.add_to_interval(self.interval, out, self.trainer["accum"])
        if hasattr(self.orch_model.loss, "after_step"):
            self.orch_model.loss.after_step()
        self.votes.cast(self.stop_asked())
        phase("optimizer step (incl. clip, schedule, after_step)")
        return out["loss"]

    def hand_step(self, phase: Callable[[str], None] = lambda _: None) -> Any:
        import torch

        with self.autocast():
            loss = self.hand_model(self.batch)["loss"]
        phase("forward")
        if self.scaler:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.hand_opt)
        else:
            loss.backward()
        phase("backward")
        torch.nn.utils.clip_grad_norm_(self.hand_params, self.trainer["grad_clip"])
        if self.scaler:
            self.scaler.step(self.hand_opt)
            self.scaler.update()
        else:
            self.hand_opt.step()
        self.hand_sched.step()
        self.hand_opt.zero_grad(set_to_none=True)
        if hasattr(self.hand_model.loss, "after_step"):
            self.hand_model.loss.after_step()
        phase("optimizer step (incl. clip, schedule, after_step)")
        return loss

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def timed(steps: Steps, which: str, n: int) -> float:
    """Seconds for ``n`` steps of ``which``: orch or hand."""
    step = steps.hand_step if which == "hand" else steps.orch_step
    steps.sync()
    began = time.perf_counter()
    for _ in range(n):
        step()
    steps.sync()
    return time.perf_counter() - began


def breakdown(steps: Steps, which: str, n: int) -> dict[str, float]:
    """Mean seconds per phase of a step (synchronising between phases: slower than the real step)."""
    totals: dict[str, float] = {}
    last = [0.0]

    def phase(name: str) -> None:
        steps.sync()
        now = time.perf_counter()
        totals[name] = totals.get(name, 0.0) + now - last[0]
        last[0] = now

    step = steps.orch_step if which == "orch" else steps.hand_step
    for _ in range(n):
        steps.sync()
        last[0] = time.perf_counter()
        step(phase)
    return {k: v / n for k, v in totals.items()}


def profile(steps: Steps, which: str, n: int, top: int) -> str:
    step = steps.orch_step if which == "orch" else steps.hand_step
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        step()
    steps.sync()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    if which == "orch":
        out.write("DeepSpeed's own functions only:\n")
        stats.sort_stats("cumulative").print_stats("deepspeed", top)
    return out.getvalue()


def measure(device_name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from orchestrator.registry import Registry
    from orchestrator.spec import resolve_run

    device = torch.device(device_name)
    registry = Registry.load()
    choices = {k: v for k, v in (("data", args.data), ("encoder", args.encoder), ("text_encoder", args.text_encoder),
                                 ("loss", args.loss)) if v}
    trainer = {k: str(v) for k, v in (("batch_size", args.batch_size), ("precision", args.precision)) if v}
    spec = resolve_run(registry, choices, trainer)
    steps = Steps(spec, registry, device)

    first_orch = steps.orch_step().detach().float().item()
    first_hand = steps.hand_step().detach().float().item()
    for _ in range(args.warmup - 1):
        steps.orch_step()
        steps.hand_step()
    variants = ["orch", "hand"]
    rounds = []
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        t = {which: timed(steps, which, args.steps_per_round) for which in order}
        rounds.append(t)
    n = args.rounds * args.steps_per_round
    orch_s, hand_s = sum(t["orch"] for t in rounds), sum(t["hand"] for t in rounds)
    result = {
        "device": device_name if device.type == "cpu" else torch.cuda.get_device_name(device),
        "precision": steps.precision, "batch_size": spec["trainer"]["batch_size"],
        "model": {k: spec[k]["name"] + str(spec[k]["options"]) for k in ("encoder", "text_encoder", "loss")
                  if spec.get(k)},
        "parameters": sum(p.numel() for p in steps.hand_params), "threads": torch.get_num_threads(),
        "orch_steps_per_s": n / orch_s, "hand_steps_per_s": n / hand_s, "ratio": hand_s / orch_s,
        "median_round_ratio": median([t["hand"] / t["orch"] for t in rounds]),
        "best_round_ratio": min(t["hand"] for t in rounds) / min(t["orch"] for t in rounds),
        "rounds": rounds, "first_loss_orch": first_orch, "first_loss_hand": first_hand,
        "first_loss_bitwise_equal": first_orch == first_hand,
    }
    result["breakdown"] = {which: breakdown(steps, which, args.breakdown_steps) for which in ("orch", "hand")}
    if args.profile or result["ratio"] < args.target:
        result["profile"] = {which: profile(steps, which, args.profile_steps, args.profile_top)
                             for which in ("orch", "hand")}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/overhead.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default=None,
                        help="comma-separated: cpu, cuda (default cpu, plus cuda if present)")
    parser.add_argument("--encoder", default=None, help="NAME[:k=v,...] (default: the default spec's)")
    parser.add_argument("--text-encoder", default=None, help="NAME[:k=v,...] (default: the default spec's)")
    parser.add_argument("--loss", default=None, help="NAME[:k=v,...] (default: the default spec's)")
    parser.add_argument("--data", default=None, help="NAME[:k=v,...] (default: the default spec's)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the default spec's, 128)")
    parser.add_argument("--precision", default=None, help="auto, fp32, bf16, fp16 (default: the spec's, auto)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own choice); 1 is steadier on a busy machine")
    parser.add_argument("--warmup", type=int, default=10, help="steps of each before timing (default 10)")
    parser.add_argument("--rounds", type=int, default=20, help="alternating timed rounds (default 20)")
    parser.add_argument("--steps-per-round", type=int, default=10, help="steps of each per round (default 10)")
    parser.add_argument("--breakdown-steps", type=int, default=10, help="steps of the per-phase pass (default 10)")
    parser.add_argument("--target", type=float, default=0.97, help="target ratio orch/hand (default 0.97)")
    parser.add_argument("--profile", action="store_true", help="always cProfile the steps (default: under target)")
    parser.add_argument("--profile-steps", type=int, default=20, help="steps profiled (default 20)")
    parser.add_argument("--profile-top", type=int, default=25, help="functions listed (default 25)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    info = header("bench/overhead.py: orch (DeepSpeed engine) step vs hand-written PyTorch step")
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())})
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = [measure(d, args) for d in devices]
    print()
    print(table(["device", "precision", "batch", "params", "threads", "orch steps/s", "hand steps/s", "orch/hand",
                 "median round ratio", "best-round ratio", "target", "first loss equal"],
                [[r["device"], r["precision"], r["batch_size"], r["parameters"], r["threads"], r["orch_steps_per_s"],
                  r["hand_steps_per_s"], r["ratio"], r["median_round_ratio"], r["best_round_ratio"],
                  f">= {args.target}", "yes" if r["first_loss_bitwise_equal"] else
                  f"no ({r['first_loss_orch']!r} vs {r['first_loss_hand']!r})"] for r in results]))
    for r in results:
        print(f"\nper-phase ms per step on {r['device']} (synchronised between phases; separate pass):")
        phases = list(r["breakdown"]["orch"])
        print(table(["phase", "orch ms", "hand ms", "orch - hand ms"],
                    [[p, 1000 * r["breakdown"]["orch"][p], 1000 * r["breakdown"]["hand"].get(p, 0.0),
                      1000 * (r["breakdown"]["orch"][p] - r["breakdown"]["hand"].get(p, 0.0))] for p in phases]))
        if "profile" in r:
            print(f"\ncProfile of {args.profile_steps} orch steps on {r['device']}:\n{r['profile']['orch']}")
            print(f"\ncProfile of {args.profile_steps} hand steps on {r['device']}:\n{r['profile']['hand']}")
    write_json(args.json, {**info, "results": results, "target": args.target})
    return 0


if __name__ == "__main__":
    sys.exit(main())
