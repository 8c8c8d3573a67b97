"""One attempt of one run, in one rank: build, (resume,) train, checkpoint, evaluate.

Launched by the worker, one process per GPU (or gloo processes on the CPU), with the resolved spec in
``run_dir/spec.json``. Rank 0 writes metrics and checkpoints to the store (fenced by the attempt) and
calls the lifecycle hooks; the worker owns the run's state transitions.

Exit codes: 0 finished, 2 failed for good (reason in ``attempt-N.result.json``), 3 fenced off, 4 stopped after
saving a checkpoint, at the worker's request (``attempt-N.stop``) or on SIGTERM to a rank (with
``ORCH_CHECKPOINT_ON_SIGTERM``; rank 0 writes ``{"stopped": STEP}`` there). Once every rank is done, rank 0 writes
``{"finished": true}`` to ``attempt-N.result.json``: a rank that dies while its interpreter shuts down (gloo's
threads can abort it then) does not turn a finished run into a retried one.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import faulthandler
import json
import os
import queue
import random
import shutil
import signal
import sys
import threading
import time
import traceback
from collections.abc import Collection, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from orchestrator.data import loader_workers
from orchestrator.engine.checkpoint import (
    UNIVERSAL,
    is_disk_full,
    load_rank_state,
    needs_universal,
    saved_world_size,
    universal_checkpoint,
    write_manifest,
)
from orchestrator.engine.compose import Composition, RunModel, build, to_device
from orchestrator.engine.dsconfig import (
    clips_outside_deepspeed,
    deepspeed_config,
    effective_precision,
    warmup_cosine,
    weight_decay_at,
)
from orchestrator.engine.evaluation import EvalContext, EvalInterrupted, SplitImages
from orchestrator.engine.gradcache import engine_cached_step
from orchestrator.engine.scale import prepare, run_after_step
from orchestrator.engine.software import check_ranks_agree, fingerprint
from orchestrator.errors import UserError
from orchestrator.launch import CHECKPOINT_ON_SIGTERM, STALL_TIMEOUT, die_with_parent
from orchestrator.registry import Registry
from orchestrator.runinfo import RunInfo
from orchestrator.store import Claim, Fenced, Store

EXIT_FAILED, EXIT_FENCED, EXIT_STOPPED = 2, 3, 4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLoss(Exception):
    pass


class Stopped(Exception):
    """The ranks were asked to stop: they saved a checkpoint at this step, the next attempt resumes it."""


# SIGTERM to the ranks themselves (systemd's default KillMode and a plain `scancel` signal every process): with
# ORCH_CHECKPOINT_ON_SIGTERM set, a rank notes it and stops as when its worker asks; a hard stop is SIGKILL
_signalled = threading.Event()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.engine.train")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--attempt", type=int, required=True)
    parser.add_argument("--resume-tag", default=None)
    args = parser.parse_args(argv)
    die_with_parent(signal.SIGKILL)  # the launcher died: stop at once, not as an orphan (SIGTERM may only ask)
    if os.environ.get(CHECKPOINT_ON_SIGTERM):
        signal.signal(signal.SIGTERM, lambda signum, frame: _signalled.set())

    meta = json.loads((args.run_dir / "run.json").read_text())
    spec = json.loads((args.run_dir / "spec.json").read_text())
    rank = int(os.environ.get("RANK", "0"))
    claim = Claim(meta["id"], args.attempt)
    registry = Registry.load()
    run = RunInfo(meta["id"], meta["uid"], meta["name"], spec, meta["spec_hash"], args.attempt, args.run_dir)
    try:
        store = Store.open() if rank == 0 else None  # ORCH_STORE, set by the worker (not argv: ps shows it)
        train(spec, registry, run, store, claim, args.resume_tag)
        return 0
    except Fenced as exc:
        print(f"orch: stopping: {exc}", file=sys.stderr)
        return EXIT_FENCED
    except Stopped as exc:
        if rank == 0:
            print(f"orch: stopping as asked: {exc}", flush=True)
        return EXIT_STOPPED
    except (UserError, NonFiniteLoss) as exc:
        return _fail(run, registry, rank, str(exc))
    except torch.cuda.OutOfMemoryError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        return _fail(run, registry, rank, f"out of GPU memory ({first}): lower the micro-batch (--batch-size, or "
                                          f"raise --accum), raise --zero, or use activation checkpointing or "
                                          f"gradient caching where the encoder and loss offer them")
    except Exception:
        traceback.print_exc()
        raise


def _fail(run: RunInfo, registry: Registry, rank: int, reason: str) -> int:
    """A failure that retrying cannot fix: say why, and tell the worker not to retry. A rank other than 0 says it
    in its own file: when it fails alone, the others see only a closed connection, and the worker needs its why."""
    if rank == 0:
        print(f"orch: run {run.id} failed: {reason}", file=sys.stderr)
        _write_whole(run.result_path, {"error": reason})
        registry.notify("run_ended", run=run, status="failed", error=reason)
    else:
        reason = f"rank {rank}: {reason}"
        print(f"orch: run {run.id} failed: {reason}", file=sys.stderr)
        _write_whole(run.failure_path(rank), {"error": reason})
    return EXIT_FAILED


def _write_whole(path: Path, outcome: dict[str, Any]) -> None:
    """A rank's last word to the worker (``result_path``, ``failure_path``), written whole or not at all: the
    worker may read it after a SIGKILL."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome))
    tmp.replace(path)


def train(spec: dict[str, Any], registry: Registry, run: RunInfo, store: Store | None, claim: Claim,
          resume_tag: str | None) -> None:
    trainer = spec["trainer"]
    alive = SignOfLife(run.alive_path if int(os.environ.get("RANK", "0")) == 0 else None,
                       float(os.environ.get(STALL_TIMEOUT, "0")))
    device = _device()
    precision = effective_precision(trainer["precision"], device.type,
                                    device.type == "cuda" and torch.cuda.is_bf16_supported())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # before anything is built: every rank must build the same thing
        import deepspeed

        deepspeed.init_distributed()
        check_ranks_agree(fingerprint(registry, spec))
    random.seed(trainer["seed"])
    np.random.seed(trainer["seed"])
    comp = build(registry, spec)
    alive()  # and after each long part of the start
    model = comp.model
    prepare(model, trainer, spec)  # activation checkpointing, torch.compile

    if world > 1 and device.type == "cuda":  # batch norm over the global batch, as SimCLR (torch: CUDA only)
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    checkpoints = run.run_dir / "checkpoints"
    universal = bool(resume_tag) and needs_universal(checkpoints / resume_tag, world)  # saved on other ranks
    engine, scheduler = make_engine(model, trainer, device, precision, world, load_universal=universal)
    alive()
    rank, world = dist.get_rank(), dist.get_world_size()
    run = dataclasses.replace(run, device=f"{_device_name(device)} x{world} {precision}")
    if rank == 0:
        print(f"orch: run {run.id} trains on {run.device}", flush=True)

    step, epoch, batch_in_epoch, eval_pending = 0, 0, 0, False
    interval: dict[str, torch.Tensor] = {}  # loss sums since the last log, per rank
    interval_steps = 0
    if resume_tag:
        load_dir, tag = checkpoints, resume_tag
        if universal:  # ZeRO partitioned the optimizer over another number of ranks: convert once, load that
            if rank == 0:
                print(f"orch: {resume_tag} was saved by {saved_world_size(checkpoints / resume_tag)} rank(s) with a "
                      f"partitioned optimizer; loading it on {world} through a universal checkpoint", flush=True)
                universal_checkpoint(checkpoints / resume_tag)
            dist.barrier()
            load_dir, tag = checkpoints / resume_tag, UNIVERSAL
        _, client = engine.load_checkpoint(str(load_dir), tag=tag)
        alive()
        state = client["orch"]
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch"]
        eval_pending = state.get("eval_pending", False)  # the attempt before was stopped during this evaluation
        comp.sampler.load_state_dict(state["sampler"])
        rank_state = load_rank_state(checkpoints / resume_tag, rank, world)
        _set_rng(rank_state["rng"])
        interval = {k: v.to(device) for k, v in rank_state["interval"].items()}
        interval_steps = rank_state["interval_steps"]

    reporter = Reporter(store, claim, registry, run) if rank == 0 else None
    if reporter:
        if resume_tag:
            store.forget_after(claim, step)
        registry.notify("run_started", run=run, resumed_from=step if resume_tag else None)
    votes = StopVote(device, world)
    stop_asked = StopAsked(run.stop_request_path if rank == 0 else None, alive)

    def evaluate() -> dict[str, float] | None:
        """Every evaluator at this step; None when a stop request interrupted them (every rank agrees)."""
        if rank == 0 and comp.evaluators:
            print(f"orch: evaluating step {step}: {', '.join(name for name, _ in comp.evaluators)}", flush=True)
        results = _evaluate(comp, model, device, precision, trainer, stop_asked)
        if results is None and rank == 0:
            print(f"orch: the evaluation of step {step} was interrupted by a stop request; it runs again when the "
                  f"run resumes", flush=True)
        return results

    def stop() -> None:
        """Every rank has saved this step (or had it saved already): end the attempt for the worker to resume."""
        votes.drain()
        if reporter:
            reporter.close()
            _write_whole(run.result_path, {"stopped": step})
        dist.destroy_process_group()  # every rank is past the last collective: the save's, or the evaluation's
        raise Stopped(f"checkpoint saved at step {step}")

    if eval_pending:  # saved with it: evaluate before training on, as the uninterrupted run did
        results = evaluate()
        if results is None:
            stop()
        if reporter:
            reporter.log(step, results)
    train_split = comp.dataset.train
    labels = getattr(train_split, "labels", None)
    micro = trainer["batch_size"] // (world * trainer["accum"])
    if hasattr(comp.sampler, "setup"):
        comp.sampler.setup(train_split)
    refresh_every = getattr(comp.sampler, "refresh_every", 0) or 0
    if refresh_every and not resume_tag:  # a resumed sampler has its refreshed state back already
        _refresh_sampler(comp, model, device, precision, trainer["workers"], alive)

    def epoch_loader(epoch: int, start: int) -> tuple[int, Any]:
        """This rank's micro-batches of ``epoch`` from global batch ``start`` on, and the epoch's batch count."""
        batches = comp.sampler.batches(len(train_split), labels, trainer["batch_size"], trainer["seed"], epoch)
        batches = [b for b in batches if len(b) == trainer["batch_size"]]  # ranks need equal shards
        if not batches:
            raise UserError(f"dataset {spec['data']['name']} has {len(train_split)} training samples, fewer than "
                            f"one batch of {trainer['batch_size']}: lower --batch-size")
        shards.batches = [[(epoch, i) for i in b[(a * world + rank) * micro:(a * world + rank + 1) * micro]]
                          for b in batches[start:] for a in range(trainer["accum"])]
        return len(batches), iter(loader)  # persistent workers: the same processes, drained of the old epoch

    shards, loader = make_loader(train_split, model, trainer, rank, device)

    grad_cache = trainer.get("grad_cache", 0)  # specs queued before the option have none
    interval_start, data_wait = time.perf_counter(), 0.0
    while step < trainer["steps"]:
        epoch_batches, micro_batches = epoch_loader(epoch, batch_in_epoch)
        while batch_in_epoch < epoch_batches:
            for _ in range(trainer["accum"]):
                asked = time.perf_counter()
                batch = next(micro_batches)
                data_wait += time.perf_counter() - asked  # open_clip's data_time: is the loader keeping up?
                if grad_cache:  # GradCache (Gao et al. 2021): the batch in chunks, the same gradients; the batch
                    out = engine_cached_step(engine, batch, grad_cache)  # stays in host memory, chunk by chunk
                else:
                    out = engine(to_device(batch, device))
                    engine.backward(out["loss"])
                del batch  # not held while the next one is loaded: a cached batch can be tens of GiB
                engine.step()
                _add_to_interval(interval, out, trainer["accum"])
            run_after_step(model.loss, engine.optimizer)  # on the fp32 masters, gathered under ZeRO-3
            step, batch_in_epoch, interval_steps = step + 1, batch_in_epoch + 1, interval_steps + 1

            logging = step % trainer["log_every"] == 0 or step == trainer["steps"]
            saving = trainer["checkpoint_every"] and step % trainer["checkpoint_every"] == 0 or step == trainer["steps"]
            stopping = votes.cast(stop_asked())  # any rank's request: every rank saves at the same step, soon
            saving = saving or stopping
            if logging or saving:  # never log or checkpoint a diverged model
                scalars = _mean_over_ranks(interval, interval_steps)
                bad = {k: v for k, v in scalars.items() if not np.isfinite(v)}
                if bad:
                    terms = ", ".join(f"{k}={v}" for k, v in bad.items())
                    raise NonFiniteLoss(f"non-finite {terms} between steps {step - interval_steps + 1} and {step}; "
                                        f"the last valid checkpoint is kept: lower --lr or raise --warmup")
            if logging:
                elapsed = time.perf_counter() - interval_start
                scalars = {f"train/{k}": v for k, v in scalars.items()}
                scalars["train/lr"] = scheduler.get_last_lr()[0]
                if trainer.get("weight_decay_end") is not None:
                    scalars["train/weight_decay"] = weight_decay_at(trainer, step - 1)  # that of the last step
                scalars["train/samples_per_s"] = interval_steps * trainer["batch_size"] / max(elapsed, 1e-9)
                scalars["train/data_wait"] = min(data_wait / max(elapsed, 1e-9), 1.0)
                if rank == 0:
                    print(f"step {step}/{trainer['steps']}  loss {scalars.get('train/loss', float('nan')):.4f}  "
                          f"{scalars['train/samples_per_s']:.0f} samples/s  "
                          f"{scalars['train/data_wait']:.0%} waiting for data", flush=True)
                if reporter:
                    reporter.log(step, scalars)
                interval, interval_start, interval_steps, data_wait = {}, time.perf_counter(), 0, 0.0
            eval_pending = False
            if trainer["eval_every"] and step % trainer["eval_every"] == 0 and step < trainer["steps"]:
                results = None if stopping else evaluate()
                if results is None:  # stopping: save this step now, and evaluate it when the run resumes
                    eval_pending = stopping = saving = True
                elif reporter:
                    reporter.log(step, results)
            if refresh_every and step % refresh_every == 0 and step < trainer["steps"]:  # before the save: a resume
                _refresh_sampler(comp, model, device, precision, trainer["workers"], alive)  # starts refreshed
                epoch_batches, micro_batches = epoch_loader(epoch, batch_in_epoch)
            if saving:
                rank_state = {"rng": _get_rng(), "interval": interval, "interval_steps": interval_steps}
                _save(engine, comp, checkpoints, step, epoch, batch_in_epoch, reporter, rank, rank_state,
                      eval_pending)
            if stopping:
                stop()
            if step >= trainer["steps"]:
                break
        epoch, batch_in_epoch = epoch + 1, 0

    votes.drain()
    results = evaluate()
    if results is None:  # the last step's checkpoint is saved: the next attempt starts with this evaluation
        stop()
    alive()
    # ZeRO-3 partitions the parameters: every rank helps gather them, layer by layer, onto rank 0's CPU
    full = engine._zero3_consolidated_16bit_state_dict() if trainer["zero"] == 3 else None
    if rank == 0:
        protocols = {name: ev.protocol() for name, ev in comp.evaluators if hasattr(ev, "protocol")}
        _write_final(run, model, results, protocols, full)
        reporter.log(step, results)
        reporter.close()
        registry.notify("run_ended", run=run, status="finished", error=None)
    else:
        alive.pause()  # rank 0 writes the weights alone
    dist.barrier()
    if rank == 0:  # every rank reached the barrier: all the run's work is saved, whatever happens at exit
        _write_whole(run.result_path, {"finished": True})
    dist.destroy_process_group()  # every rank is past the barrier: nothing is in flight (NCCL warns otherwise)


def make_engine(model: RunModel, trainer: dict[str, Any], device: torch.device, precision: str,
                world: int, load_universal: bool = False) -> tuple[Any, Any]:
    """The DeepSpeed engine every run trains with: torch's AdamW (CLIP's betas and eps, no weight decay on
    biases, norms and temperatures), warmup-cosine schedule, the synthesised config. bench/overhead.py
    measures this same engine against a hand-written loop. ``load_universal``: it will load a universal
    checkpoint (one saved at another world size), which DeepSpeed must know from the start."""
    import deepspeed

    fixed = {id(p) for p in getattr(model.loss, "fixed_lr_parameters", tuple)()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = _decay_groups([p for p in trainable if id(p) not in fixed], trainer["weight_decay"])
    factors = [warmup_cosine(trainer["warmup"], trainer["steps"])] * 2
    if fixed:  # a loss's fixed-rate parameters (SimSiam's predictor): two more groups, at the base rate throughout
        groups += _decay_groups([p for p in trainable if id(p) in fixed], trainer["weight_decay"])
        factors += [_constant] * 2
    optimizer = torch.optim.AdamW(groups, lr=trainer["lr"], betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    if trainer.get("weight_decay_end") is not None:
        decaying = groups[0::2]  # _decay_groups: the matrices' group first, then the no-decay one

        def decay(*_: Any) -> None:  # inside engine.step(); the schedule's count is restored with a checkpoint
            for group in decaying:
                group["weight_decay"] = weight_decay_at(trainer, schedule.last_epoch)

        optimizer.register_step_pre_hook(decay)
    if world == 1 and not dist.is_initialized():  # a lone rank (started without torchrun): no rendezvous
        from deepspeed.accelerator import get_accelerator

        dist.init_process_group(get_accelerator().communication_backend_name(), store=dist.HashStore(),
                                rank=0, world_size=1)
    config = deepspeed_config(trainer, world, precision)
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                                   config=config)
    if world == 1 and trainer["zero"] == 0:
        engine.enable_backward_allreduce = False  # averaging over one rank only copies: 1.6% of a CPU step
    if engine.optimizer is optimizer:  # ZeRO-0 without loss scaling, where DeepSpeed's engine.zero_grad walks
        # named_parameters() every step (71 us for the default model on a CPU; the optimizer's own takes 14 us)
        engine.zero_grad = partial(optimizer.zero_grad, set_to_none=True)
    if clips_outside_deepspeed(trainer, precision):
        if engine.optimizer is not optimizer:
            raise RuntimeError(f"DeepSpeed wrapped the optimizer in {type(engine.optimizer).__name__} at ZeRO-0; "
                               f"orch's gradient clipping expects the torch optimizer itself")

        def clip(*_: Any) -> None:  # inside engine.step(), at the accumulation boundary, on the averaged gradients
            torch.nn.utils.clip_grad_norm_(trainable, trainer["grad_clip"], foreach=True)

        optimizer.register_step_pre_hook(clip)
    return engine, scheduler


def _decay_groups(params: list[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms and temperatures are not decayed (CLIP, open_clip)."""
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def _constant(step: int) -> float:
    """The LR multiplier of a loss's ``fixed_lr_parameters``: the base rate at every step."""
    return 1.0


def make_loader(split: Any, model: RunModel, trainer: dict[str, Any], rank: int,
                device: torch.device) -> tuple[_Shards, torch.utils.data.DataLoader]:
    """An attempt's one loader of ``split`` and its batch sampler: set ``shards.batches`` to this rank's
    ``(epoch, index)`` micro-batches, then iterate. ``--workers`` processes live across epochs, each keeping
    ``--prefetch`` micro-batches ready; on a GPU the batches come pinned, except with ``--grad-cache``, whose
    step pins one chunk at a time (a whole cached batch pinned would take twice its size in host memory).
    (bench/loader.py measures this.)"""
    shards, workers = _Shards(), trainer["workers"]
    pin = device.type == "cuda" and not trainer.get("grad_cache")
    loader = torch.utils.data.DataLoader(
        _EpochSplit(split), batch_sampler=shards, **loader_workers(workers), pin_memory=pin,
        collate_fn=partial(_collate_epoch, model=model, seed=trainer["seed"]), persistent_workers=workers > 0,
        prefetch_factor=trainer.get("prefetch", 2) if workers else None, generator=_loader_generator(trainer, rank))
    return shards, loader


class _Shards:
    """The batch sampler of an attempt's one loader: this rank's micro-batches of the current epoch, as
    ``(epoch, index)`` keys, so that loader workers living across epochs seed each view by its own epoch."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self) -> Any:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _EpochSplit(torch.utils.data.Dataset):
    """The loader's dataset: a micro-batch of ``(epoch, index)`` keys -> its samples (``_Samples``), which the
    split decodes one at a time as collation reaches them."""

    def __init__(self, split: Any) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, keys: list[tuple[int, int]]) -> _Samples:
        return _Samples(self.split, keys)


class _Samples:
    """A micro-batch's ``(index, item)`` samples, each read from the split only when iteration reaches it, so
    collation holds a sample or two beside the batch it fills: a list of a batch's decoded samples would be a second
    copy of the batch (tens of GiB for a cached batch of 65,536 images of 224 px; docs/scale.md measures it)."""

    def __init__(self, split: Any, keys: list[tuple[int, int]]) -> None:
        self.split, self.keys = split, keys
        self.epoch = keys[0][0]  # a micro-batch never spans epochs (epoch_loader)

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        for _, index in self.keys:
            yield index, self.split[index]


def _collate_epoch(samples: _Samples, model: RunModel, seed: int) -> dict[str, Any]:
    return _collate(samples, model, seed=seed, epoch=samples.epoch)


def _loader_generator(trainer: dict[str, Any], rank: int) -> torch.Generator:
    """The loader's own RNG (its workers' base seed): creating an iterator never draws from the training RNG, so a
    resumed attempt's RNG continues exactly where the checkpointed one stopped."""
    seed = int(np.random.SeedSequence((trainer["seed"], rank)).generate_state(1, np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(seed)


def _collate(samples: Collection[tuple[int, dict[str, Any]]], model: RunModel, seed: int,
             epoch: int) -> dict[str, Any]:
    """Apply each tower's own preprocessing: the image transform (after the loss's views) and the tokenizer. One
    pass over ``samples``, each sample dropped once its rows of the batch are filled (``_Samples``)."""
    n, needs = len(samples), model.needs
    transform, views = model.image_encoder.transform, model.loss.views if "views" in needs else ()
    images = _Rows(n) if needs & {"image", "image-tokens"} else None
    view_rows = [_Rows(n) for _ in views]
    texts, labels = [], []
    threads = torch.get_num_threads()
    if views:
        torch.set_num_threads(1)  # per-sample ops are tiny: one thread, as in a loader worker, is faster
    try:
        for index, item in samples:
            if images is not None:
                images.add(transform(item["image"]))
            for v, (view, rows) in enumerate(zip(views, view_rows)):
                rows.add(transform(_augment(view, item["image"], (seed, epoch, index, v))))
            if needs & {"text", "text-tokens"}:
                texts.append(item["text"])
            if "label" in needs:
                labels.append(item["label"])
    finally:
        torch.set_num_threads(threads)
    batch: dict[str, Any] = {}
    if images is not None:
        batch["image"] = images.out
    if views:
        batch["views"] = [rows.out for rows in view_rows]
    if needs & {"text", "text-tokens"}:
        batch["text"] = model.text_tower.tokenize(texts)
    if "label" in needs:
        batch["label"] = torch.tensor(labels)
    return batch


class _Rows:
    """``torch.stack`` of ``n`` samples added one at a time, each copied into the batch as it comes: a list of them
    would be a second copy of the batch (tens of GiB for a cached batch of 65,536 images). In a loader worker the
    batch is made in shared memory, as torch's ``default_collate`` makes it: sending a batch from ordinary memory
    copies it into shared memory first."""

    def __init__(self, n: int) -> None:
        self.n, self.count, self.out = n, 0, None

    def add(self, tensor: torch.Tensor) -> None:
        if self.out is None:
            shape = (self.n, *tensor.shape)
            if torch.utils.data.get_worker_info() is None:
                self.out = tensor.new_empty(shape)
            else:
                storage = tensor._typed_storage()._new_shared(self.n * tensor.numel(), device=tensor.device)
                self.out = tensor.new(storage).view(shape)
        elif tensor.shape != self.out.shape[1:]:
            raise ValueError(f"stack expects each tensor to be equal size, but got {list(self.out.shape[1:])} at "
                             f"entry 0 and {list(tensor.shape)} at entry {self.count}")
        self.out[self.count] = tensor
        self.count += 1


def _augment(view: Any, image: torch.Tensor, key: tuple[int, int, int, int]) -> torch.Tensor:
    """One view of one sample, its randomness a function of (seed, epoch, index, view) only: the same on any
    rank, with any number of loader workers, and after a resume; the training RNG is left untouched.
    (Only the CPU generator is touched: ``torch.manual_seed`` would also seed every accelerator, per sample.)"""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> 1))
    try:
        return view(image)
    finally:
        generator.set_state(state)


def _refresh_sampler(comp: Composition, model: RunModel, device: torch.device, precision: str, workers: int,
                     alive: SignOfLife) -> None:
    """Give the sampler the normalised train embeddings under the current image tower (every rank alike)."""
    ctx = EvalContext(model.image_encoder, model.text_tower, comp.dataset, device, DTYPES[precision], workers=workers,
                      stop_asked=alive.never_stop)
    model.eval()
    with _rng_kept():
        embeddings = ctx.encode_images(SplitImages(comp.dataset.train))
    model.train()
    comp.sampler.refresh(embeddings.float().cpu())


def _add_to_interval(interval: dict[str, torch.Tensor], out: dict[str, torch.Tensor], accum: int) -> None:
    """Add a micro-batch's logged scalars to the sums since the last log, on the device (no sync). Each is a
    kernel on a GPU: no division by an ``accum`` of 1."""
    for key, value in out.items():
        value = value.detach().float()
        interval[key] = interval.get(key, 0) + (value / accum if accum > 1 else value)


def _mean_over_ranks(sums: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
    """The interval's mean loss terms over ranks: one all_reduce."""
    keys = sorted(sums)
    values = torch.stack([sums[k].reshape(()) for k in keys]) / steps
    if dist.get_world_size() > 1:
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(keys, values.cpu().tolist()))


class SignOfLife:
    """What the worker's ``--stall-timeout`` watches, given at each step and at each batch an evaluation or a
    sampler's refresh encodes (with the stop check) and at most once a second: rank 0 touches ``alive_path``, and
    every rank re-arms faulthandler to write its threads' Python stacks to the log should no sign follow within
    the timeout. A hung run (a read from a stalled network file system, a deadlocked plugin) thus says where it
    hung before the worker stops it. NCCL's own timeout ends a collective that waits for a hung rank, but nothing
    ends a lone rank's hang."""

    def __init__(self, path: Path | None, timeout: float) -> None:
        self.path, self.timeout, self.given = path, timeout, -1.0
        self()

    def __call__(self) -> None:
        if not self.timeout or time.monotonic() - self.given < 1.0:
            return
        self.given = time.monotonic()
        faulthandler.dump_traceback_later(self.timeout)
        if self.path is not None:
            self.path.touch()

    def never_stop(self) -> bool:
        """A sign, in the place of a stop check (``EvalContext.stop_asked``) where a stop cannot be taken."""
        self()
        return False

    def pause(self) -> None:
        """No stacks until the next sign: this rank waits for rank 0 alone (its evaluation), whose signs count."""
        if self.timeout:
            faulthandler.cancel_dump_traceback_later()
            self.given = -1.0


class StopAsked:
    """Whether this rank was asked to stop: SIGTERM to it (with ``ORCH_CHECKPOINT_ON_SIGTERM``), or the worker's
    stop file, which rank 0 looks for at most every 0.2 s (on a shared filesystem a look can be a round trip to
    its metadata server, too slow for every step). Each look is also a sign of life."""

    def __init__(self, request_path: Path | None, alive: SignOfLife | None = None) -> None:
        self.request_path, self.alive, self.looked = request_path, alive or SignOfLife(None, 0.0), 0.0

    def __call__(self) -> bool:
        self.alive()
        if _signalled.is_set():
            return True
        if self.request_path is None or time.monotonic() - self.looked < 0.2:
            return False
        self.looked = time.monotonic()
        return self.request_path.exists()


class StopVote:
    """Whether any rank was asked to stop, agreed on by every rank at the same step, checked every step.

    A rank's vote of step ``s`` travels in a one-number all_reduce (MAX) that nobody waits for; every rank reads
    the result at step ``s + LAG``, by when it has long arrived, and all stop there together. On a GPU a side
    stream waits for the reduction and copies the result to pinned host memory behind an event: the training
    stream never waits for the vote, and reading it waits for step ``s`` only, never for the steps queued since
    (the host keeps running ahead of the GPU). A stop thus comes within ``LAG`` steps of the request instead of
    at the next log step, however sparse the logging."""

    LAG = 2

    def __init__(self, device: torch.device, world: int) -> None:
        self.cuda, self.world = device.type == "cuda", world
        self.votes = [torch.zeros(1, device=device) for _ in range(self.LAG + 1)]
        self.host = [torch.zeros(1, pin_memory=True) for _ in self.votes] if self.cuda else self.votes
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.pending: collections.deque[tuple[Any, torch.Tensor]] = collections.deque()
        self.cast_count = 0

    def cast(self, asked: bool) -> bool:
        """Vote for this step; True when the vote of ``LAG`` steps ago says any rank was asked: stop now."""
        if self.world == 1:  # nobody to agree with
            return asked
        slot = self.cast_count % len(self.votes)  # read LAG casts ago, so free again
        self.cast_count += 1
        vote = self.votes[slot].fill_(float(asked))
        work = dist.all_reduce(vote, op=dist.ReduceOp.MAX, async_op=True)
        if self.cuda:
            with torch.cuda.stream(self.side):
                work.wait()  # NCCL: the side stream waits for the reduction; the host does not
                self.host[slot].copy_(vote, non_blocking=True)
                work = torch.cuda.Event()
                work.record()
        self.pending.append((work, self.host[slot]))
        if len(self.pending) <= self.LAG:
            return False
        return self._read()

    def drain(self) -> None:
        """Wait for the votes in flight: no collective may be pending when the process group goes."""
        while self.pending:
            self._read()

    def _read(self) -> bool:
        work, result = self.pending.popleft()
        if self.cuda:
            work.synchronize()  # the event after the copy: this step's GPU work, not the steps queued since
        else:
            work.wait()
        return result.item() > 0


def _evaluate(comp: Composition, model: RunModel, device: torch.device, precision: str,
              trainer: dict[str, Any], stop_asked: StopAsked | None = None) -> dict[str, float] | None:
    """Run every evaluator; the RNGs are kept so evaluating never changes the training trajectory. With
    ``stop_asked``, a stop request on rank 0 interrupts the evaluators between batches: None, on every rank."""
    results: dict[str, float] | None = {}
    everywhere = trainer["zero"] == 3  # partitioned parameters: every rank must take part in forwards
    if dist.get_rank() == 0 or everywhere:
        ctx = EvalContext(model.image_encoder, model.text_tower, comp.dataset, device, DTYPES[precision],
                          workers=trainer["workers"])
        if stop_asked is not None:  # under ZeRO-3 the ranks would have to agree on a stop at every batch: there
            ctx.stop_asked = stop_asked.alive.never_stop if everywhere else stop_asked  # a batch is only a sign
        model.eval()
        try:
            with _rng_kept():
                for name, evaluator in comp.evaluators:
                    for key, value in evaluator.evaluate(ctx).items():
                        results[f"{name}/{key}"] = float(value)
        except EvalInterrupted:
            results = None
        finally:
            model.train()
    elif stop_asked is not None:
        stop_asked.alive.pause()
    interrupted = torch.tensor([float(results is None)], device=device)
    dist.all_reduce(interrupted, op=dist.ReduceOp.MAX)  # rank 0's word, and the barrier the ranks need here
    return None if interrupted.item() else results


def _save(engine: Any, comp: Composition, root: Path, step: int, epoch: int, batch: int,
          reporter: Reporter | None, rank: int, rank_state: dict[str, Any], eval_pending: bool = False) -> None:
    """DeepSpeed's save on every rank, plus each rank's RNG and unlogged loss sums (DeepSpeed keeps only
    rank 0's client state); valid in the store only once every rank has written it whole. ``eval_pending``: a
    stop request interrupted this step's evaluation, which the next attempt runs first."""
    tag = f"step-{step:08d}"
    state = {"orch": {"step": step, "epoch": epoch, "batch": batch, "sampler": comp.sampler.state_dict(),
                      "world_size": dist.get_world_size(), "eval_pending": eval_pending}}
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
        torch.save(rank_state, root / tag / f"rank{rank}.pt")
        failed = torch.zeros(1, device=engine.device)
    except Exception as exc:  # noqa: BLE001 - classified below; every rank must reach the all_reduce
        if not is_disk_full(exc, root):
            raise
        failed = torch.ones(1, device=engine.device)
    dist.all_reduce(failed)
    if failed.item():
        if rank == 0:
            shutil.rmtree(root / tag, ignore_errors=True)
        raise UserError(f"disk full while writing checkpoint step {step} under {root}: free space (or set "
                        f"ORCH_RUNS_DIR elsewhere) and `orch resume`; the previous checkpoint stays valid")
    if reporter:
        write_manifest(root / tag, world_size=dist.get_world_size())
        reporter.checkpoint(step, root / tag)
    dist.barrier()


def _write_final(run: RunInfo, model: RunModel, results: dict[str, float], protocols: dict[str, Any],
                 full: dict[str, torch.Tensor] | None = None) -> None:
    """The final weights per part; ``full`` is the run model's gathered state dict under ZeRO-3 (where the
    modules' own state dicts hold empty partitions)."""
    final = run.weights_path.parent
    final.mkdir(parents=True, exist_ok=True)
    parts = ["image_encoder", "loss"] + (["text_encoder"] if model.text_encoder is not None else [])
    if full is None:
        weights = {part: getattr(model, part).state_dict() for part in parts}
    else:
        weights = {part: {k[len(part) + 1:]: v for k, v in full.items() if k.startswith(part + ".")} for part in parts}
    torch.save(weights, run.weights_path)
    report = {"metrics": results, "protocols": protocols, "spec": run.spec}
    run.eval_report_path.write_text(json.dumps(report, indent=2, default=str))


def _get_rng() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


@contextlib.contextmanager
def _rng_kept() -> Iterator[None]:
    """Python's, numpy's and torch's global RNG states as they were before the block: a plugin's evaluator or
    sampler refresh may draw from any of them (``torch.random.fork_rng`` keeps torch's alone)."""
    state = _get_rng()
    try:
        yield
    finally:
        _set_rng(state)


def _set_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _device() -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class Reporter:
    """Rank 0's writer: metrics go to the store and the trackers from a thread, off the hot path."""

    def __init__(self, store: Store, claim: Claim, registry: Registry, run: RunInfo) -> None:
        self.store, self.claim, self.registry, self.run = store, claim, registry, run
        self.queue: queue.Queue[tuple[int, dict[str, float]] | None] = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._work, name="orch-reporter", daemon=True)
        self.thread.start()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.error:
            raise self.error
        if metrics:
            self.queue.put((step, metrics))

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            step, metrics = item
            try:
                self.store.log_metrics(self.claim, [(step, k, v) for k, v in metrics.items()])
            except BaseException as exc:  # noqa: BLE001 - surfaced to the training loop by log()
                self.error = exc
                return
            self.registry.notify("metrics_logged", run=self.run, step=step, metrics=metrics)

    def checkpoint(self, step: int, path: Path) -> None:
        self.flush()
        for stale in self.store.add_checkpoint(self.claim, step, str(path)):
            shutil.rmtree(stale, ignore_errors=True)
        self.registry.notify("checkpoint_saved", run=self.run, step=step, path=path)

    def flush(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error:
            raise self.error
        self.thread = threading.Thread(target=self._work, name="orch-reporter", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error:
            raise self.error


if __name__ == "__main__":
    sys.exit(main())
