"""On a CUDA GPU (marked ``gpu``, skipped without one): the paths the CPU suite cannot reach. bf16 autocast through
DeepSpeed at every ZeRO stage with NCCL, the learnable temperature's clamp on the fp32 masters there, GradCache's
exactness with CUDA kernels and through the bf16 engine, ``torch.compile`` of the encoders, the stop vote's read
behind an event, and a whole ``orch run``.

Exactness checks run in fp32 with TF32 off (cuDNN's default TF32 convolutions would round the patch embedding to
10 bits); bf16 checks compare against fp32 at bf16's resolution (8 bits of mantissa), which still catches a wrong
step (a missing chunk or a skipped clamp moves results by far more).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.engine.compose import RunModel
from orchestrator.engine.gradcache import cached_step
from orchestrator.engine.scale import prepare
from orchestrator.spec import resolve_trainer
from orchestrator.testing import leave_rank
from plugins.encoders.text_transformer import TextTransformer
from plugins.encoders.vit import VisionTransformer
from plugins.losses.infonce import InfoNCE
from tests.conftest import free_port, orch

pytestmark = pytest.mark.gpu

BF16 = 2**-7  # bf16's relative resolution (8-bit significand)


def _model(seed: int = 0, **loss: Any) -> RunModel:
    torch.manual_seed(seed)
    image = VisionTransformer(image_size=32, patch_size=8, width=64, depth=2, heads=2, embed_dim=32)
    text = TextTransformer(width=64, depth=2, heads=2, context_length=16, embed_dim=32)
    return RunModel(image, text, InfoNCE(**loss), {"image", "text"})


def _pairs(n: int, device: torch.device | str, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randn(n, 3, 32, 32, generator=generator),
             "text": torch.randint(0, 256, (n, 16), generator=generator)}
    return {k: v.to(device) for k, v in batch.items()}


def _grads(model: RunModel) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_grads(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], tolerance: float) -> None:
    """Each tensor within ``tolerance`` of its own largest gradient, as tests/engine/test_gradcache.py."""
    assert expected.keys() == actual.keys()
    for name, a in expected.items():
        worst = (a - actual[name]).abs().max().item()
        assert worst <= tolerance * max(1.0, a.abs().max().item()), f"{name}: {worst}"


@pytest.fixture
def exact_fp32() -> Any:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_grad_cache_equals_the_full_batch_with_cuda_kernels(exact_fp32: None) -> None:
    """Gao et al. 2021: the cached step's loss and gradients are the full batch's (1e-5, as on the CPU)."""
    device = torch.device("cuda")
    batch = _pairs(96, device)
    reference, cached = _model().to(device), _model().to(device)
    expected = reference(batch)
    expected["loss"].backward()
    out = cached_step(cached, batch, chunk=20)  # 5 chunks, the last one short
    assert abs(out["loss"].item() - expected["loss"].item()) <= 1e-5
    _assert_close_grads(_grads(reference), _grads(cached), 1e-5)
    # as train.py: the batch in (unpinned) host memory, each chunk pinned and copied as it is encoded
    from_host = _model().to(device)
    out = cached_step(from_host, {k: v.cpu() for k, v in batch.items()}, chunk=20, device=device)
    assert abs(out["loss"].item() - expected["loss"].item()) <= 1e-5
    _assert_close_grads(_grads(reference), _grads(from_host), 1e-5)


def test_compile_matches_eager_on_the_gpu(exact_fp32: None) -> None:
    device = torch.device("cuda")
    batch = _pairs(32, device)
    eager, compiled = _model().to(device), _model().to(device)
    names = list(compiled.state_dict())
    prepare(compiled, resolve_trainer({"compile": "true"}))
    assert list(compiled.state_dict()) == names
    for _ in range(2):  # the second call runs the compiled graph without recompiling
        for model in (eager, compiled):
            model.zero_grad()
            model(batch)["loss"].backward()
        torch.testing.assert_close(compiled(batch)["loss"], eager(batch)["loss"], rtol=1e-4, atol=1e-5)
        _assert_close_grads(_grads(eager), _grads(compiled), 1e-4)


# --- through DeepSpeed with NCCL, in a spawned process (a process group per process) ----------------------------

def _engine_rank(rank: int, port: int, out: str, configs: list[dict[str, Any]]) -> None:
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    import deepspeed

    from orchestrator.engine.gradcache import engine_cached_step
    from orchestrator.engine.scale import fp32_master, run_after_step
    from orchestrator.engine.train import make_engine

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    results = []
    for config in configs:
        # InfoNCE starts at scale 1/0.07 = 14.3 above its bound of 10: the first step's clamp must reach the masters
        model = _model(temperature=0.07, max_logit_scale=10.0).to(device)
        trainer = resolve_trainer({"batch_size": "32", "zero": str(config["zero"]), "steps": "10", "warmup": "0",
                                   "lr": "0.001", "compile": str(config.get("compile", False)).lower()})
        prepare(model, trainer)
        engine, _ = make_engine(model, trainer, device, config["precision"], world=1)
        batch = _pairs(32, device)
        losses, scales, first_grads = [], [], None
        for step in range(4):
            if config.get("grad_cache"):  # as train.py: the batch in host memory, pinned and moved chunk by chunk
                host = {k: v.cpu() for k, v in batch.items()}
                output = engine_cached_step(engine, host, chunk=config["grad_cache"])
            else:
                output = engine(batch)
                engine.backward(output["loss"])
            if step == 0 and config["zero"] == 0:
                first_grads = {k: v.cpu().tolist() for k, v in _grads(model).items() if v.numel() <= 4096}
            engine.step()
            run_after_step(model.loss, engine.optimizer)
            losses.append(float(output["loss"]))
            scales.append(float(output["logit_scale"]))
        scale = model.loss.logit_scale
        master = fp32_master(scale, engine.optimizer)
        with deepspeed.zero.GatheredParameters([scale], enabled=config["zero"] == 3):
            working = float(scale.detach().float().reshape(-1)[0])
        results.append({**config, "losses": losses, "scales": scales, "working": working,
                        "master": None if master is None else float(master.reshape(-1)[0]),
                        "first_grads": first_grads, "param_dtype": str(next(model.parameters()).dtype)})
        del engine
    Path(out).write_text(json.dumps(results))
    leave_rank()


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    # ZeRO-3 last: it patches torch.nn.functional.linear for the rest of the process, which a later compiled
    # model would trace (one real run is one ZeRO stage per process, and --compile with --zero 3 is refused)
    configs = [{"precision": "fp32", "zero": 0}, *({"precision": "bf16", "zero": z} for z in (0, 1, 2)),
               {"precision": "bf16", "zero": 0, "grad_cache": 8}, {"precision": "bf16", "zero": 2, "compile": True},
               {"precision": "bf16", "zero": 3}]
    out = tmp_path_factory.mktemp("gpu") / "engine.json"
    mp.spawn(_engine_rank, args=(free_port(), str(out), configs), nprocs=1, join=True)
    return json.loads(out.read_text())


def _find(runs: list[dict[str, Any]], **where: Any) -> dict[str, Any]:
    return next(r for r in runs if all(r.get(k, False) == v for k, v in where.items())
                and not any(r.get(k) for k in ("grad_cache", "compile") if k not in where))


def test_bf16_trains_like_fp32_at_every_zero_stage(engine_runs: list[dict[str, Any]]) -> None:
    """bf16 is autocast over fp32 weights (the AMP recipe): the weights stay fp32 and every ZeRO stage follows the
    fp32 loss curve to within bf16's resolution (a few steps, so rounding cannot compound far)."""
    reference = _find(engine_runs, precision="fp32", zero=0)["losses"]
    assert reference[-1] < reference[0]
    for zero in (0, 1, 2, 3):
        run = _find(engine_runs, precision="bf16", zero=zero)
        assert run["param_dtype"] == "torch.float32", zero
        assert run["losses"] == pytest.approx(reference, rel=4 * BF16), f"ZeRO-{zero}: {run['losses']} vs {reference}"


def test_temperature_clamp_holds_on_the_fp32_masters_on_the_gpu(engine_runs: list[dict[str, Any]]) -> None:
    """Starting at 1/0.07 = 14.3 above the bound 10: from the second step on, the forward sees at most 10, and
    the module's copy and DeepSpeed's master (ZeRO 1-3) hold at most ln(10)."""
    bound = torch.tensor(10.0).log().item()
    for run in engine_runs:
        where = f"{run['precision']} ZeRO-{run['zero']}"
        assert run["scales"][0] == pytest.approx(1 / 0.07, rel=1e-2), where
        assert all(s <= 10.0 * (1 + BF16) for s in run["scales"][1:]), f"{where}: {run['scales']}"
        assert run["working"] <= bound + 1e-6, where
        if run["zero"] > 0:
            assert run["master"] is not None and run["master"] <= bound + 1e-6, where


def test_grad_cache_through_the_bf16_engine(engine_runs: list[dict[str, Any]]) -> None:
    """engine_cached_step under DeepSpeed's autocast: the same loss and first gradients as the plain bf16 step,
    to bf16's resolution (each chunk's matmuls round on their own)."""
    plain, cached = _find(engine_runs, precision="bf16", zero=0), _find(engine_runs, grad_cache=8)
    assert cached["losses"] == pytest.approx(plain["losses"], rel=2 * BF16)
    grads = {k: torch.tensor(v) for k, v in plain["first_grads"].items()}
    _assert_close_grads(grads, {k: torch.tensor(v) for k, v in cached["first_grads"].items()}, 4 * BF16)


def test_compiled_encoders_train_like_eager_under_zero_2(engine_runs: list[dict[str, Any]]) -> None:
    eager, compiled = _find(engine_runs, precision="bf16", zero=2), _find(engine_runs, compile=True)
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=4 * BF16)


def test_orch_run_trains_in_bf16_on_the_gpu(workdir: Path) -> None:
    """The main command on the GPU: precision auto picks bf16, and the run learns (zero-shot far above chance)."""
    from orchestrator.store import Store

    result = orch("run", "--encoder", "vit", "--loss", "infonce", "--eval", "zs", "--steps", "200", "--quiet",
                  cwd=workdir, env={"ORCH_DISABLE_PLUGINS": "mlflow"})
    log = (workdir / "runs" / "1" / "attempt-1.log").read_text()
    assert result.returncode == 0, result.stdout + result.stderr + log
    assert f"trains on {torch.cuda.get_device_name(0)} x1 bf16" in log
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    assert store.run(1)["status"] == "finished"
    assert store.final_metrics(1)["zs/top1"] >= 50.0


def _vote_rank(rank: int, port: int, out: str) -> None:
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch.distributed as dist

    from orchestrator.engine.train import StopVote

    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    votes = StopVote(torch.device("cuda", 0), world=2)  # the GPU path on one GPU: a 1-rank MAX is the vote
    x = torch.randn(8192, 8192, device="cuda")
    decisions, queued = [], []
    for step in range(8):
        for _ in range(10):  # a step's worth of GPU work, queued
            y = x @ x
        decisions.append(votes.cast(step == 3))
        queued.append(not torch.cuda.current_stream().query())  # reading the vote left this step's work queued
    votes.drain()
    del y
    Path(out).write_text(json.dumps({"decisions": decisions, "queued": queued}))
    leave_rank()


def test_the_stop_vote_reads_its_result_without_waiting_for_the_queued_steps(tmp_path: Path) -> None:
    """``StopVote`` on a GPU: the vote of step 3 is read at step 5, and reading it (an event after a copy to pinned
    memory) waits for step 3's work only, so the host stays ahead of the GPU; ``.item()`` on the GPU tensor would
    have waited for everything queued."""
    import torch.multiprocessing as mp

    out = tmp_path / "vote.json"
    mp.spawn(_vote_rank, args=(free_port(), str(out)), nprocs=1, join=True)
    result = json.loads(out.read_text())
    assert result["decisions"] == [step == 5 for step in range(8)]
    assert all(result["queued"][2:]), result["queued"]  # steps 2-7 read a vote; the GPU was still busy after each
