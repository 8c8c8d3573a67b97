"""Scaling options: --gpus N|all (worker and run), hostfile launches, activation checkpointing, torch.compile,
the learnable temperature's clamp on the fp32 masters (ZeRO-3 with 2 gloo processes), loader options."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from orchestrator import launch
from orchestrator.engine.compose import RunModel
from orchestrator.engine.scale import fp32_master, prepare, run_after_step
from orchestrator.errors import UserError
from orchestrator.launch import Launch, command, environment, parse_gpus, plan, read_hostfile, worker_devices
from orchestrator.runinfo import TIMING_METRICS
from orchestrator.spec import TRAINER_OPTIONS, resolve_trainer
from orchestrator.testing import leave_rank
from plugins.encoders.text_transformer import TextTransformer
from plugins.encoders.vit import VisionTransformer
from plugins.losses.infonce import InfoNCE
from tests.conftest import free_port, orch


@pytest.fixture(autouse=True)
def _fresh_gpu_count() -> None:
    launch.visible_gpus.cache_clear()


def _gpus_present(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(launch, "visible_gpus", lambda: n)


# --- --gpus N|all -------------------------------------------------------------------------------

def test_run_gpus_takes_a_number_or_all() -> None:
    assert resolve_trainer({"gpus": "all", "batch_size": "100"})["gpus"] == "all"  # divisibility: at launch
    assert resolve_trainer({"gpus": "2", "batch_size": "64"})["gpus"] == 2
    assert next(o for o in TRAINER_OPTIONS if o.name == "gpus").type_name == "int | all"
    with pytest.raises(UserError, match="not an integer or one of all"):
        resolve_trainer({"gpus": "many"})
    with pytest.raises(UserError, match="--gpus must be at least 1"):
        resolve_trainer({"gpus": "0"})
    with pytest.raises(UserError, match="--prefetch must be at least 1"):
        resolve_trainer({"prefetch": "0"})


def test_worker_gpus_option() -> None:
    assert parse_gpus("all") == "all" and parse_gpus(" 4 ") == 4
    for bad, message in (("0", "at least 1"), ("two", "neither a number nor 'all'")):
        with pytest.raises(UserError, match=message):
            parse_gpus(bad)


def test_all_means_every_visible_gpu_and_too_many_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus_present(monkeypatch, 4)
    assert worker_devices("all") == 4 and worker_devices(None) == 4 and worker_devices(2) == 2
    with pytest.raises(UserError, match=r"--gpus 8: this machine has 4 visible GPU\(s\)"):
        worker_devices(8)


def test_cpu_machine_gpus_count_gloo_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus_present(monkeypatch, 0)
    assert worker_devices(None) is None  # no limit: a run's --gpus N is N gloo processes, as before
    assert worker_devices(3) == 3
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        worker_devices("all")


def test_plan_decides_processes_at_launch() -> None:
    assert plan(2, 64, 1, devices=None) == Launch(2)  # CPU: gloo processes
    assert plan("all", 64, 2, devices=8) == Launch(8)
    assert plan(4, 64, 1, devices=8) == Launch(4)
    with pytest.raises(UserError, match="asks for --gpus 8 but this worker has 4"):
        plan(8, 64, 1, devices=4)
    with pytest.raises(UserError, match="no CUDA GPU is visible"):
        plan("all", 64, 1, devices=None)
    with pytest.raises(UserError, match="not divisible by 3 processes"):
        plan("all", 64, 1, devices=3)
    hosts = [("a", 8), ("b", 8)]
    assert plan("all", 256, 1, devices=8, hosts=hosts) == Launch(16, hosts)
    assert plan(16, 256, 1, devices=8, hosts=hosts) == Launch(16, hosts)
    assert plan(4, 256, 1, devices=8, hosts=hosts) == Launch(4)  # fits here: this machine alone
    assert plan("all", 64, 1, devices=None, hosts=[("localhost", 2)]) == Launch(2)  # one host: torchrun, no ssh


def test_visible_gpus_reads_nvidia_smi_and_cuda_visible_devices(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})'\n"
                                           for i in range(4)) + "echo '  MIG 1g.10gb Device 0: (UUID: MIG-x)'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    for mask, expected in ((None, 4), ("0,1", 2), ("", 0), ("-1", 0), ("1,7,2", 1), ("GPU-0,GPU-2", 2)):
        if mask is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mask)
        launch.visible_gpus.cache_clear()
        assert launch.visible_gpus() == expected, mask


def test_worker_gpus_all_without_a_gpu_is_one_line(workdir: Path) -> None:
    if launch.visible_gpus():
        pytest.skip("this machine has a GPU")
    for flag, message in (("all", "no CUDA GPU is visible on this machine"), ("0", "at least 1"),
                          ("x", "neither a number nor 'all'")):
        result = orch("worker", "--gpus", flag, cwd=workdir)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_a_run_needing_more_than_the_worker_has_waits_for_another_without_launching(workdir: Path) -> None:
    """Another worker of the store may have the GPUs: the run stays queued, with the reason (it used to fail)."""
    from orchestrator.store import Store

    if 0 < launch.visible_gpus() < 2:
        pytest.skip("needs 0 or at least 2 GPUs")
    assert orch("queue", "--gpus", "4", "--batch-size", "64", cwd=workdir).returncode == 0
    result = orch("worker", "--gpus", "2", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "run 1: worker " in result.stdout and "the run asks for --gpus 4 but this worker has 2" in result.stdout
    assert "left 1 run(s) it cannot run (1)" in result.stdout
    run = Store.open(f"sqlite:///{workdir}/experiments.db").run(1)
    assert run["status"] == "queued" and "--gpus 4" in run["error"] and run["failures"] == 0
    assert not (workdir / "runs" / "1" / "attempt-1.log").exists()  # no process was started


# --- hostfiles ----------------------------------------------------------------------------------

def test_hostfile_is_checked_line_by_line(tmp_path: Path) -> None:
    good = tmp_path / "hosts"
    good.write_text("# the cluster\nnode-a slots=8\n\nnode-b slots=8  # second\n")
    assert read_hostfile(good) == [("node-a", 8), ("node-b", 8)]
    for text, message in (("node-a\n", "line 1: 'node-a' is not 'HOST slots=N'"), ("a slots=0\n", "N >= 1"),
                          ("a slots=2\na slots=2\n", "listed twice"), ("# nothing\n", "lists no hosts")):
        good.write_text(text)
        with pytest.raises(UserError, match=message):
            read_hostfile(good)
    with pytest.raises(UserError, match="cannot read it"):
        read_hostfile(tmp_path / "missing")


def test_launch_commands() -> None:
    args = ["--run-dir", "/runs/1", "--attempt", "1"]
    local = command(Launch(2), args)
    assert local[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]
    assert local[-5:] == ["orchestrator.engine.train", *args] and environment(Launch(2)) == {}
    alone = command(Launch(1), args)  # one process: no launcher, the rank variables come from environment()
    assert alone[1:] == ["-m", "orchestrator.engine.train", *args]
    assert {k: environment(Launch(1))[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")} == \
        {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    multi = command(Launch(16, [("a", 8), ("b", 8)]), args, Path("/etc/hosts.ds"), 29555, "10.0.0.5")
    assert multi[1:5] == ["-m", "deepspeed.launcher.runner", "--hostfile", "/etc/hosts.ds"]
    assert {"--no_local_rank", "--module", "--master_port=29555", "--master_addr=10.0.0.5"} <= set(multi)
    assert multi[-5:] == ["orchestrator.engine.train", *args] and environment(Launch(1, [("a", 1)])) == {}


# --- activation checkpointing and compile -------------------------------------------------------

def _tiny_model(seed: int = 0) -> RunModel:
    torch.manual_seed(seed)
    image = VisionTransformer(image_size=16, patch_size=8, width=32, depth=2, heads=2, embed_dim=16)
    text = TextTransformer(width=32, depth=2, heads=2, context_length=12, embed_dim=16)
    return RunModel(image, text, InfoNCE(), {"image", "text"})


def _batch(model: RunModel) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"image": torch.randn(6, 3, 16, 16), "text": model.text_tower.tokenize([f"digit {i}" for i in range(6)])}


def _loss_and_grads(model: RunModel) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(_batch(model))["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_loss_and_gradients() -> None:
    plain, checkpointed = _tiny_model(), _tiny_model()
    trainer = resolve_trainer({"activation_checkpointing": "true"})
    prepare(checkpointed, trainer, {"encoder": {"name": "vit"}, "text_encoder": {"name": "text-transformer"}})
    assert checkpointed.image_encoder.grad_checkpointing and checkpointed.text_encoder.grad_checkpointing
    loss_a, grads_a = _loss_and_grads(plain)
    loss_b, grads_b = _loss_and_grads(checkpointed)
    torch.testing.assert_close(loss_b, loss_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)


def test_activation_checkpointing_names_an_encoder_without_it() -> None:
    model = RunModel(nn.Linear(4, 4), nn.Linear(4, 4), InfoNCE(), {"image", "text"})
    with pytest.raises(UserError, match="encoder my-mlp has no set_grad_checkpointing"):
        prepare(model, {"activation_checkpointing": True}, {"encoder": {"name": "my-mlp"}, "text_encoder": None})


def test_compile_matches_eager_and_keeps_parameter_names() -> None:
    eager, compiled = _tiny_model(), _tiny_model()
    names = list(compiled.state_dict())
    prepare(compiled, resolve_trainer({"compile": "true"}))
    assert list(compiled.state_dict()) == names  # checkpoints and final weights unchanged
    loss_a, grads_a = _loss_and_grads(eager)
    loss_b, grads_b = _loss_and_grads(compiled)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-4, atol=1e-5)
    for name in grads_a:  # fused kernels sum in another order, with rounding errors that scale with the terms
        scale = max(1.0, grads_a[name].abs().max().item())
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-3, atol=1e-5 * scale, msg=name)


def test_compile_refuses_zero_3() -> None:
    with pytest.raises(UserError, match="--compile with --zero 3"):
        prepare(_tiny_model(), resolve_trainer({"compile": "true", "zero": "3"}))


# --- the learnable temperature under DeepSpeed's masters and ZeRO-3 -----------------------------

class _Tower(nn.Linear):
    """A linear tower that takes fp32 inputs into a bf16 engine, as the built-in encoders do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype))


def _clamp_rank(rank: int, world: int, port: int, out: str, configs: list[tuple[str, int, bool]]) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import deepspeed

    from orchestrator.engine.train import make_engine

    results = []
    for precision, zero, fixed in configs:
        torch.manual_seed(0)
        model = RunModel(_Tower(16, 8), _Tower(16, 8), InfoNCE(temperature=0.07, max_logit_scale=10.0),
                         {"image", "text"})
        trainer = resolve_trainer({"batch_size": str(4 * world), "gpus": str(world), "zero": str(zero),
                                   "steps": "10", "warmup": "0", "lr": "0.01"})
        engine, _ = make_engine(model, trainer, torch.device("cpu"), precision, world)
        generator = torch.Generator().manual_seed(rank)
        batch = {"image": torch.randn(4, 16, generator=generator), "text": torch.randn(4, 16, generator=generator)}
        seen = []
        for _ in range(3):
            output = engine(batch)
            seen.append(float(output["logit_scale"]))
            engine.backward(output["loss"])
            engine.step()
            if fixed:
                run_after_step(model.loss, engine.optimizer)
            else:
                model.loss.after_step()
        scale = model.loss.logit_scale
        master = fp32_master(scale, engine.optimizer)
        with deepspeed.zero.GatheredParameters([scale], enabled=zero == 3):
            working = float(scale.detach().float().reshape(-1)[0])
        results.append({"precision": precision, "zero": zero, "fixed": fixed, "seen": seen, "working": working,
                        "master": None if master is None else float(master.reshape(-1)[0])})
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    leave_rank()


@pytest.mark.slow
def test_temperature_clamp_reaches_the_fp32_masters_under_zero_3_with_two_ranks(tmp_path: Path) -> None:
    """InfoNCE starts at scale 1/0.07 = 14.3 above its bound of 10: after each step the scale the next forward
    sees, the module's copy and DeepSpeed's fp32 master must all be within ln(10) (bf16 rounding aside)."""
    import torch.multiprocessing as mp

    configs = [("fp32", 0, True), ("fp32", 1, True), ("fp32", 3, True), ("bf16", 0, True), ("bf16", 2, True),
               ("bf16", 3, True), ("bf16", 2, False), ("bf16", 3, False)]
    out = tmp_path / "clamp.json"
    mp.spawn(_clamp_rank, args=(2, free_port(), str(out), configs), nprocs=2, join=True)
    bound = torch.tensor(10.0).log().item()
    results = json.loads(out.read_text())
    for r in results:
        where = f"{r['precision']} ZeRO-{r['zero']}"
        if not r["fixed"]:  # the plain in-place clamp: the module's copy is clamped, the master is not
            assert r["master"] > bound + 1e-3, f"{where}: expected the unfixed clamp to miss the master"
            continue
        assert r["seen"][0] == pytest.approx(1 / 0.07, rel=1e-2), where
        assert all(s <= 10.0 * 1.01 for s in r["seen"][1:]), f"{where}: forward saw {r['seen']}"
        assert r["working"] <= bound + 1e-6, where
        if r["zero"] == 0:  # no master (bf16 is autocast over fp32 weights): the parameter is the optimizer's
            assert r["master"] is None, where
        else:
            assert r["master"] <= bound + 1e-6, f"{where}: fp32 master {r['master']} above ln(10)"


# --- the loader options end to end --------------------------------------------------------------

SMALL = ["--encoder", "vit:depth=1,width=32,heads=2,embed_dim=32", "--text-encoder",
         "text-transformer:depth=1,width=32,heads=2,embed_dim=32", "--batch-size", "512", "--steps", "12",
         "--log-every", "4", "--checkpoint-every", "0", "--eval", "zs:split=test"]


@pytest.mark.slow
def test_persistent_loader_workers_and_activation_checkpointing_end_to_end(workdir: Path) -> None:
    """MNIST's 5,000 training digits make 9 batches of 512: 12 steps cross an epoch boundary. Loader workers that
    live across epochs (with prefetch) give bitwise the run of the training process loading alone; activation
    checkpointing gives the same losses within float tolerance."""
    from orchestrator.store import Store

    runs = [[], ["--workers", "2", "--prefetch", "3"], ["--activation-checkpointing", "true"]]
    for i, extra in enumerate(runs, 1):
        result = orch("run", *SMALL, *extra, "--quiet", cwd=workdir)
        assert result.returncode == 0, result.stdout + result.stderr + (workdir / f"runs/{i}/attempt-1.log").read_text()
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    series = [{(m["name"], m["step"]): m["value"] for m in store.metrics(i) if m["name"] not in TIMING_METRICS}
              for i in (1, 2, 3)]
    assert series[1] == series[0]
    assert series[2].keys() == series[0].keys()
    for key, value in series[0].items():
        assert series[2][key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


def test_a_run_bound_by_its_loader_says_so(workdir: Path) -> None:
    """``train/data_wait``, the share of wall time the training loop waited for batches: a tiny model fed from a CSV
    of large JPEGs, decoded when indexed (2,000 x 2,000 pixels each), spends most of its steps waiting."""
    import numpy as np
    from PIL import Image

    from orchestrator.store import Store

    noise = np.random.default_rng(0).integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(workdir / "big.jpg", quality=95)
    rows = [f"big.jpg,photo number {i}" for i in range(40)]
    (workdir / "big.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    result = orch("run", "--data", "csv:path=big.csv,image_size=32,test_fraction=0.1",
                  "--encoder", "vit:image_size=32,patch_size=8,depth=1,width=32,heads=2,embed_dim=32",
                  "--text-encoder", "text-transformer:depth=1,width=32,heads=2,embed_dim=32", "--batch-size", "16",
                  "--steps", "4", "--log-every", "2", "--checkpoint-every", "0", "--eval", "retrieval", "--quiet",
                  cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    waits = [m["value"] for m in Store.open(f"sqlite:///{workdir}/experiments.db").metrics(1)
             if m["name"] == "train/data_wait"]
    assert len(waits) == 2 and all(0.5 < w <= 1 for w in waits), waits
    assert "waiting for data" in (workdir / "runs/1/attempt-1.log").read_text()


@pytest.mark.slow
def test_zero_3_run_writes_whole_final_weights(workdir: Path) -> None:
    """Under ZeRO-3 each rank holds a slice of every parameter: the final weights are gathered, not empty."""
    tiny = ["--encoder", "vit:depth=1,width=32,heads=2,embed_dim=32", "--text-encoder",
            "text-transformer:depth=1,width=32,heads=2,embed_dim=32", "--batch-size", "64", "--steps", "2",
            "--eval", "zs:split=test", "--zero", "3", "--gpus", "2", "--quiet"]
    result = orch("run", *tiny, cwd=workdir)
    assert result.returncode == 0, result.stdout + result.stderr
    weights = torch.load(workdir / "runs" / "1" / "final" / "weights.pt", map_location="cpu", weights_only=False)
    reference = RunModel(VisionTransformer(depth=1, width=32, heads=2, embed_dim=32),
                         TextTransformer(depth=1, width=32, heads=2, embed_dim=32), InfoNCE(), {"image", "text"})
    for part in ("image_encoder", "text_encoder", "loss"):
        expected = {k: tuple(v.shape) for k, v in getattr(reference, part).state_dict().items()}
        assert {k: tuple(v.shape) for k, v in weights[part].items()} == expected, part


@pytest.mark.slow
def test_clip_throughput_bench_runs_tiny(tmp_path: Path) -> None:
    """The CPU smoke run of bench/clip_throughput.py: both steps train, and the two towers have the same FLOPs."""
    import subprocess

    pytest.importorskip("open_clip")
    out = tmp_path / "clip.json"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "bench/clip_throughput.py", "--tiny", "--models", "ViT-B-16", "--rounds",
                             "2", "--steps-per-round", "1", "--json", str(out)], cwd=root, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [r] = json.loads(out.read_text())["results"]
    orch_, open_clip = r["variants"]["orch"], r["variants"]["open_clip"]
    assert orch_["samples_per_s"] > 0 and open_clip["samples_per_s"] > 0 and open_clip["vs_open_clip"] == 1.0
    assert orch_["forward_gflops_per_sample"] == pytest.approx(open_clip["forward_gflops_per_sample"], rel=1e-3)


def test_loader_bench_feeds_both_pipelines_the_same_images(tmp_path: Path) -> None:
    """bench/loader.py, small: orch's training loader (``make_loader``, with loader workers too) and open_clip's data
    path deliver every training image of the same shards and CSV, in batches of the same shape; the start-up builds
    (each checks it indexed every sample) and the index memory measurements run."""
    import subprocess

    out = tmp_path / "loader.json"
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "bench/loader.py", "--sizes", "40x300", "--images", "12",
                             "--batch-size", "4", "--shard-size", "4", "--workers", "0,2", "--rounds", "1",
                             "--round-seconds", "0", "--index-shards", "3", "--index-per-shard", "10", "--json",
                             str(out)], cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["index_seconds"]) == ["webdataset", "csv"]
    assert all(len(times) == 6 and all(s > 0 for s in times.values()) for times in report["index_seconds"].values())
    memory = report["index_memory"]
    assert [(m["format"], m["samples"]) for m in memory] == [(f, 30) for f in ("webdataset", "csv", "imagefolder")]
    assert all(m["held"] > 0 and m["gc"] > 0 for m in memory)
    results = report["results"]
    assert [(r["format"], r["size"], r["workers"]) for r in results] == [
        (f, "40x300", w) for f in ("webdataset", "csv") for w in (0, 2)]
    for r in results:
        assert r["samples_per_pass"] == {"orch": 12, "open_clip": 12}, r
        assert r["batch_shape"] == {"orch": [4, 3, 224, 224], "open_clip": [4, 3, 224, 224]}, r
        assert r["orch"] > 0 and r["open_clip"] > 0 and r["ratio"] == pytest.approx(r["orch"] / r["open_clip"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
