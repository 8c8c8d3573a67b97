"""Bad input: every case is one clear line on stderr, exit code 2, no traceback, nothing half-written.

Most cases run the real command line in-process (`orchestrator.cli.main`); cases that need another
installed package or a training process run it in a subprocess.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orchestrator import cli
from orchestrator.store import Store
from tests.conftest import install_module_plugin, orch

HUGE = "x" * 10_000


@pytest.fixture
def scene(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A store with one queued run, and files and folders for the cases to point at."""
    monkeypatch.setattr(sys, "argv", ["orch", "queue", "--steps", "3"])
    with pytest.raises(SystemExit) as queued:
        cli.main()
    assert queued.value.code == 0
    empty = workdir / "empty"
    empty.mkdir()
    (workdir / "not-a-db.db").write_text("plain text, not SQLite " * 200)
    no_images = workdir / "no-images" / "cat"
    no_images.mkdir(parents=True)
    (no_images / "readme.txt").write_text("no pictures here")
    bad_csv = workdir / "pairs.csv"
    bad_csv.write_text("filename,text\na.png,a cat\n")
    good_csv = workdir / "good.csv"
    (workdir / "a.png").write_bytes(b"")
    good_csv.write_text("image,caption\na.png,a cat\n")
    (workdir / "a-file").write_text("")
    return {"root": workdir, "empty": empty, "no_images": no_images.parent, "bad_csv": bad_csv,
            "good_csv": good_csv}


CASES: list[tuple[str, list[str], str]] = [
    # the command line
    ("unknown command", ["bogus"], "No such command"),
    ("unknown flag", ["queue", "--no-such-flag"], "No such option"),
    ("run id not a number", ["show", "abc"], "is not a valid integer"),
    ("show missing run", ["show", "99"], "there is no run 99"),
    ("cancel missing run", ["cancel", "99"], "there is no run 99"),
    ("resume missing run", ["resume", "99"], "there is no run 99"),
    ("resume a queued run", ["resume", "1"], "only failed or cancelled"),
    ("compare nothing", ["compare"], "Missing argument"),
    ("lease too short", ["worker", "--lease", "0"], "--lease"),
    ("priority not a number", ["queue", "--priority", "high"], "is not a valid integer"),
    ("no attempts", ["queue", "--max-attempts", "0"], "--max-attempts"),
    # the spec parser
    ("empty choice", ["queue", "--loss", ""], "names no component"),
    ("only a colon", ["queue", "--loss", ":"], "names no component"),
    ("key without value", ["queue", "--encoder", "vit:depth"], "is not key=value"),
    ("key given twice", ["queue", "--encoder", "vit:depth=1,depth=2"], "given twice"),
    ("empty key", ["queue", "--encoder", "vit:=3"], "is not key=value"),
    ("huge choice", ["queue", "--loss", HUGE], "the limit is"),
    ("unicode name", ["queue", "--loss", "ïnfonce"], "did you mean infonce"),
    ("unknown encoder", ["queue", "--encoder", "vitt"], "did you mean vit"),
    ("emoji name", ["queue", "--data", "🐍"], "unknown dataset"),
    # plugin options
    ("float for int", ["queue", "--encoder", "vit:depth=1.5"], "is not an integer"),
    ("empty int", ["queue", "--encoder", "vit:depth="], "is not an integer"),
    ("text for float", ["queue", "--loss", "infonce:temperature=abc"], "is not a number"),
    ("nan float", ["queue", "--loss", "infonce:temperature=nan"], "must be finite"),
    ("not a bool", ["queue", "--loss", "infonce:learnable=maybe"], "true or false"),
    ("negative tile", ["queue", "--loss", "infonce:tile=-1"], "tile=-1 must be 0"),
    ("negative siglip tile", ["queue", "--loss", "siglip:tile=-8"], "tile=-8 must be 0"),
    ("negative filip tile", ["queue", "--loss", "filip:tile=-2"], "tile=-2 must be 0"),
    ("negative soft-infonce tile", ["queue", "--loss", "soft-infonce:tile=-4"], "tile=-4 must be 0"),
    ("not in choices", ["queue", "--encoder", "vit:pool=max"], "one of cls, mean"),
    ("unknown option", ["queue", "--sampler", "random:shuffle=true"], "valid options: drop_last=True"),
    ("huge option value", ["queue", "--encoder", f"vit:depth={HUGE}"], "the limit is"),
    ("text tower as image tower", ["queue", "--encoder", "text-transformer"], "is a text encoder"),
    ("image tower as text tower", ["queue", "--text-encoder", "vit"], "is not a text encoder"),
    ("widths differ", ["queue", "--encoder", "vit:embed_dim=64"], "give both the same embed_dim"),
    ("fraction out of range", ["queue", "--data", "mnist:test_fraction=1.5"], "test_fraction"),
    ("zero-shot without ImageNet", ["queue", "--eval", "imagenet-zs"], "ORCH_IMAGENET_ROOT"),
    ("ImageNet folder missing", ["queue", "--eval", "imagenet-zs:root=/no/such/imagenet"], "/no/such/imagenet"),
    ("ImageNet folder empty", ["queue", "--eval", "imagenet-zs:root={empty}"], "class"),
    # trainer options
    ("zero steps", ["queue", "--steps", "0"], "--steps must be at least 1"),
    ("negative steps", ["queue", "--steps", "-5"], "--steps must be at least 1"),
    ("zero learning rate", ["queue", "--lr", "0"], "--lr must be positive"),
    ("negative weight decay end", ["queue", "--weight-decay-end", "-0.4"], "--weight-decay-end must be 0 or more"),
    ("batch not divisible", ["queue", "--batch-size", "100", "--gpus", "3"], "not divisible"),
    ("unknown precision", ["queue", "--precision", "fp8"], "one of auto, fp32, bf16, fp16"),
    ("ZeRO stage 4", ["queue", "--zero", "4"], "one of 0, 1, 2, 3"),
    ("warmup past the end", ["queue", "--warmup", "600", "--steps", "500"], "--warmup 600 must be smaller"),
    ("steps not a number", ["queue", "--steps", "many"], "is not an integer"),
    ("DeepSpeed key orch sets", ["queue", "--deepspeed", "zero_optimization.stage=3"], "from --zero"),
    ("DeepSpeed section misspelt", ["queue", "--deepspeed", "zero_optimisation.overlap_comm=true"],
     "did you mean zero_optimization?"),
    ("DeepSpeed key misspelt", ["queue", "--zero", "2", "--deepspeed", "zero_optimization.overlap_com=true"],
     "overlap_com: Extra inputs are not permitted"),
    ("DeepSpeed key without value", ["queue", "--deepspeed", "overlap_comm"], "is not key.path=value"),
    # datasets
    ("image folder missing", ["queue", "--data", "imagefolder:root=/no/such/folder"], "/no/such/folder"),
    ("image folder without images", ["queue", "--data", "imagefolder:root={no_images}"], "image"),
    ("csv without its columns", ["queue", "--data", "csv:path={bad_csv}"], "caption"),
    ("csv missing", ["queue", "--data", "csv:path=/no/such.csv"], "/no/such.csv"),
    ("labels needed, none given", ["queue", "--data", "csv:path={good_csv}", "--eval", "zs"], "needs label"),
    # store URLs
    ("unknown dialect", ["--store", "notadialect://x", "ls"], "is not valid"),
    ("missing driver", ["--store", "mysql://u@localhost/x", "ls"], "is not valid"),
    ("unreachable server", ["--store", "postgresql+psycopg://u:hunter2@127.0.0.1:1/x", "ls"], "cannot open store"),
    ("folder does not exist", ["--store", "sqlite:////no/such/dir/e.db", "ls"], "does not exist"),
    ("not a database", ["--store", "sqlite:///{root}/not-a-db.db", "ls"], "cannot open store"),
    ("a folder as database", ["--store", "sqlite:///{empty}", "ls"], "is a folder"),
    # run and checkpoint folders
    ("runs folder is a file", ["--runs-dir", "{root}/a-file", "worker"], "is a file"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(scene: dict[str, Path], args: list[str], message: str, capsys: pytest.CaptureFixture[str],
                   monkeypatch: pytest.MonkeyPatch) -> None:
    args = [a.format(**scene) if "{" in a and "}" in a and a != HUGE else a for a in args]
    monkeypatch.setattr(sys, "argv", ["orch", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0] and "Traceback" not in err and "hunter2" not in err
    assert len(lines[0]) < 2000
    store = Store.open(f"sqlite:///{scene['root']}/experiments.db")
    assert [(r["id"], r["status"]) for r in store.runs()] == [(1, "queued")]  # nothing written


def test_at_least_forty_cases() -> None:
    assert len(CASES) >= 40


def test_a_plugin_whose_register_hook_raises(scene: dict[str, Path]) -> None:
    """Installed as pip would (a dist-info folder on the path): listed broken, its names refused clearly."""
    env = install_module_plugin(scene["root"] / "site", "orch-raising-plugin", "0.1",
                                "from orchestrator import hookimpl\n\n@hookimpl\ndef register_losses(register):\n"
                                "    raise ValueError('bad registration')\n")
    listed = orch("plugins", cwd=scene["root"], env=env)
    assert listed.returncode == 0 and "BROKEN: ValueError: bad registration" in listed.stdout
    refused = orch("queue", "--loss", "raising-loss", cwd=scene["root"], env=env)
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "broken plugins: orch_raising_plugin" in refused.stderr


@pytest.mark.slow
def test_a_corrupt_image_fails_the_run_with_its_name(workdir: Path) -> None:
    from PIL import Image

    for label in ("cat", "dog"):
        (workdir / "pets" / label).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (16, 16), (i * 20, 0, 0)).save(workdir / "pets" / label / f"{i}.png")
    (workdir / "pets" / "dog" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    result = orch("run", "--data", f"imagefolder:root={workdir}/pets", "--steps", "2", "--batch-size", "4", "--quiet",
                  cwd=workdir)
    assert result.returncode == 2
    run = Store.open(f"sqlite:///{workdir}/experiments.db").run(1)
    assert run["status"] == "failed" and "3.png" in run["error"] and "\n" not in run["error"]


@pytest.mark.slow
def test_a_precision_the_device_lacks_fails_the_run_once_with_what_to_use(workdir: Path) -> None:
    """fp16 on a CPU worker: DeepSpeed's own ValueError crashed each of the three attempts."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU trains in fp16: the case is a worker without one")
    result = orch("run", "--precision", "fp16", "--steps", "2", "--quiet", cwd=workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    store = Store.open(f"sqlite:///{workdir}/experiments.db")
    run = store.run(1)
    assert run["status"] == "failed" and run["error"].startswith("--precision fp16 needs a GPU"), run["error"]
    assert "\n" not in run["error"] and "--precision auto" in run["error"]
    assert [a["outcome"] for a in store.attempts(1)] == ["failed"]
