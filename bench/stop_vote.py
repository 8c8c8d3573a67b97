"""What the per-step stop vote costs ranks that train together (``StopVote`` in orchestrator/engine/train.py).

Each rank builds the default spec's model (or the choices given) with train.py's ``make_engine`` and trains on
one fixed micro-batch; rounds of ``--steps-per-round`` steps with the vote after each step (exactly train.py's
check: ``votes.cast(stop_asked())``) alternate with rounds without it
(with, without, then the reverse), every round starting at a barrier. Reported: steps/s with and without, and
the ratio without/with (1.0: free). On the CPU, 2 gloo ranks; on GPUs, one NCCL rank per GPU, or on a single
GPU one rank that takes the vote's multi-rank path (the reduction of a 1-rank group, the copy to pinned memory
and the event), which is what a GPU adds to the vote.

    python bench/stop_vote.py                         # CPU, 2 ranks, default spec
    python bench/stop_vote.py --device cuda           # every GPU (one rank each)
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
import tempfile  # noqa: E402
import time  # noqa: E402

from bench._common import free_port, header, median, table, write_json  # noqa: E402


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    import torch.distributed as dist

    from orchestrator.engine.compose import build, to_device
    from orchestrator.engine.dsconfig import effective_precision
    from orchestrator.engine.train import StopAsked, StopVote, _collate, make_engine
    from orchestrator.registry import Registry
    from orchestrator.spec import resolve_run

    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if cuda else "gloo")
    registry = Registry.load()
    choices = {k: v for k, v in (("encoder", args.encoder), ("text_encoder", args.text_encoder)) if v}
    trainer = {"batch_size": str(args.batch_size), "gpus": str(world)} if args.batch_size else {"gpus": str(world)}
    spec = resolve_run(registry, choices, trainer)
    torch.manual_seed(0)
    comp = build(registry, spec)
    micro = spec["trainer"]["batch_size"] // world
    samples = [(i, comp.dataset.train[i]) for i in range(rank * micro, (rank + 1) * micro)]
    batch = to_device(_collate(samples, comp.model, seed=0, epoch=0), device)
    precision = effective_precision(spec["trainer"]["precision"], device.type,
                                    cuda and torch.cuda.is_bf16_supported())
    engine, _ = make_engine(comp.model, spec["trainer"], device, precision, world)
    votes = StopVote(device, world=max(world, 2))  # one GPU: the multi-rank path in a 1-rank group
    request = Path(tempfile.mkdtemp(prefix="orch-stop-vote-")) / "attempt-1.stop"  # never created
    stop_asked = StopAsked(request if rank == 0 else None)

    def steps(n: int, vote: bool) -> float:
        dist.barrier()
        began = time.perf_counter()
        for _ in range(n):
            output = engine(batch)
            engine.backward(output["loss"])
            engine.step()
            if vote:
                votes.cast(stop_asked())
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - began

    steps(args.warmup, True)
    rounds = []
    for r in range(args.rounds):
        order = [True, False] if r % 2 == 0 else [False, True]
        timed = {vote: steps(args.steps_per_round, vote) for vote in order}
        rounds.append({"with": timed[True], "without": timed[False]})
    votes.drain()
    if rank == 0:
        Path(out).write_text(json.dumps({
            "device": torch.cuda.get_device_name(device) if cuda else "cpu", "ranks": world,
            "precision": precision, "batch_size": spec["trainer"]["batch_size"],
            "parameters": sum(p.numel() for p in comp.model.parameters() if p.requires_grad),
            "threads_per_rank": torch.get_num_threads(), "rounds": rounds}))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/stop_vote.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu (2 ranks) or cuda (every GPU)")
    parser.add_argument("--encoder", default=None, help="NAME[:k=v,...] (default: the default spec's)")
    parser.add_argument("--text-encoder", default=None, help="NAME[:k=v,...] (default: the default spec's)")
    parser.add_argument("--batch-size", type=int, default=None, help="global batch (default: the default spec's, 128)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank (default 1)")
    parser.add_argument("--warmup", type=int, default=10, help="steps before timing (default 10)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds of each (default 20)")
    parser.add_argument("--steps-per-round", type=int, default=10, help="steps per round (default 10)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    info = header("bench/stop_vote.py: ranks training with and without the per-step stop vote")
    import torch
    import torch.multiprocessing as mp

    world = torch.cuda.device_count() if args.device == "cuda" else 2
    if world < 1:
        raise SystemExit("--device cuda: no GPU here")
    with tempfile.TemporaryDirectory(prefix="orch-stop-vote-") as folder:
        out = Path(folder) / "rank0.json"
        mp.spawn(rank_main, args=(world, free_port(), args, str(out)), nprocs=world, join=True)
        result = json.loads(out.read_text())
    rounds, n = result["rounds"], args.rounds * args.steps_per_round
    with_s, without_s = sum(r["with"] for r in rounds), sum(r["without"] for r in rounds)
    result.update({"steps_per_s_with_vote": n / with_s, "steps_per_s_without": n / without_s,
                   "ratio": without_s / with_s,
                   "median_round_ratio": median([r["without"] / r["with"] for r in rounds])})
    print(table(["device", "ranks", "precision", "batch", "params", "threads/rank", "steps/s with vote",
                 "steps/s without", "with/without", "median round ratio"],
                [[result["device"], result["ranks"], result["precision"], result["batch_size"], result["parameters"],
                  result["threads_per_rank"], result["steps_per_s_with_vote"], result["steps_per_s_without"],
                  result["ratio"], result["median_round_ratio"]]]))
    write_json(args.json, {**info, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
