"""What a user reads after a run: `orch logs` (per attempt, --follow) and `orch compare --plot`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import orch

ISOLATE = ("ORCH_STORE", "ORCH_RUNS_DIR", "MLFLOW_TRACKING_URI", "ORCH_IMAGENET_ROOT", "ORCH_DISABLE_PLUGINS")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A working directory with two tiny finished runs (1 and 2), differing in --lr, logged every step."""
    workdir = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        for var in ISOLATE:
            mp.delenv(var, raising=False)
        queued = orch("queue", "--data", "digits", "--steps", "3", "--batch-size", "8", "--log-every", "1",
                      "--lr", "1e-3", "--lr", "2e-3", cwd=workdir)
        assert queued.returncode == 0, queued.stderr
        worked = orch("worker", "--quiet", cwd=workdir)
        assert worked.returncode == 0 and worked.stdout.count("finished") == 2, worked.stdout + worked.stderr
        yield workdir


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.slow
def test_logs_prints_the_latest_attempt(finished: Path) -> None:
    result = orch("logs", "1", cwd=finished)
    assert result.returncode == 0, result.stderr
    assert "step 3/3" in result.stdout and "step 1/3" in result.stdout
    assert result.stdout == (finished / "runs" / "1" / "attempt-1.log").read_text()
    assert orch("logs", "1", "--attempt", "1", cwd=finished).stdout == result.stdout
    followed = orch("logs", "2", "-f", cwd=finished, timeout=60)  # a finished run: prints and returns
    assert followed.returncode == 0 and "step 3/3" in followed.stdout


@pytest.mark.slow
def test_logs_errors_are_one_line(finished: Path, tmp_path: Path) -> None:
    assert "run 1 has no attempt 9: its attempts are 1" in error_line(orch("logs", "1", "--attempt", "9",
                                                                           cwd=finished))
    assert "there is no run 42" in error_line(orch("logs", "42", cwd=finished))
    elsewhere = error_line(orch("--runs-dir", str(tmp_path), "logs", "1", cwd=finished))
    assert f"there is no log at {tmp_path / '1' / 'attempt-1.log'}" in elsewhere and "--runs-dir" in elsewhere


def test_logs_of_a_run_that_has_not_started(workdir: Path) -> None:
    assert orch("queue", "--steps", "3", cwd=workdir).returncode == 0
    assert "run 1 has no log yet: it is queued" in error_line(orch("logs", "1", "-f", cwd=workdir))
    assert "have logged no metrics yet" in error_line(orch("compare", "1", "--plot", "x.png", cwd=workdir))
    assert not (workdir / "x.png").exists()


@pytest.mark.slow
def test_compare_plot_writes_a_png_of_the_curves(finished: Path) -> None:
    out = finished / "plots" / "curves.png"
    out.parent.mkdir()
    result = orch("compare", "1", "2", "--plot", str(out), cwd=finished)
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}" in result.stdout and "train/loss" in result.stdout  # the table is still printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < out.stat().st_size < 2_000_000
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and 800 <= img.width <= 2000 and 500 <= img.height <= 2000
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # lines, text and a legend, not a blank canvas
    as_json = orch("compare", "1", "2", "--json", "--plot", str(out), cwd=finished)
    assert json.loads(as_json.stdout)["runs"][1]["id"] == 2 and f"wrote {out}" in as_json.stderr


@pytest.mark.slow
def test_compare_plot_to_an_unwritable_path_is_one_line(finished: Path) -> None:
    line = error_line(orch("compare", "1", "--plot", str(finished / "no" / "such" / "dir" / "x.png"), cwd=finished))
    assert "cannot write" in line


def test_logs_and_compare_import_no_plotting_or_torch(workdir: Path) -> None:
    orch("queue", "--steps", "3", cwd=workdir)
    code = textwrap.dedent("""
        import sys
        from orchestrator import cli
        for args in (["compare", "1"], ["logs", "1"]):  # run 1 is queued: logs stops at "no log yet"
            sys.argv = ["orch", *args]
            try:
                cli.main()
            except SystemExit:
                pass
        loaded = [m for m in ("torch", "matplotlib", "deepspeed") if m in sys.modules]
        assert not loaded, loaded
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
