"""What lifecycle hooks learn about a run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Training metrics read off the wall clock (speed; the share of time spent waiting for the loader): they differ
# between runs that are otherwise bitwise equal, so comparisons of results leave them out.
TIMING_METRICS = frozenset({"train/samples_per_s", "train/data_wait"})


@dataclass(frozen=True)
class RunInfo:
    id: int
    uid: str
    name: str
    spec: dict[str, Any]
    spec_hash: str
    attempt: int
    run_dir: Path
    device: str | None = None

    @property
    def spec_path(self) -> Path:
        return self.run_dir / "spec.json"

    @property
    def weights_path(self) -> Path:
        return self.run_dir / "final" / "weights.pt"

    @property
    def eval_report_path(self) -> Path:
        return self.run_dir / "final" / "eval.json"

    @property
    def stop_request_path(self) -> Path:
        """Created by a worker told to stop: the ranks checkpoint within two steps and exit."""
        return self.run_dir / f"attempt-{self.attempt}.stop"

    @property
    def alive_path(self) -> Path:
        """Touched by rank 0 at each step and evaluation batch: the sign of life the worker's --stall-timeout
        watches."""
        return self.run_dir / f"attempt-{self.attempt}.alive"

    @property
    def result_path(self) -> Path:
        """Rank 0's last word to the worker on how the attempt ended: finished, stopped at a step, or failed and why."""
        return self.run_dir / f"attempt-{self.attempt}.result.json"

    def failure_path(self, rank: int) -> Path:
        """Why rank ``rank`` (not 0) failed in a way retrying cannot fix. A failure on one rank alone (out of memory
        on one GPU, a file missing on one node) shows the others only a closed connection, so rank 0 never says."""
        return self.run_dir / f"attempt-{self.attempt}.rank-{rank}.failed.json"

    def rank_failures(self) -> list[Path]:
        """The ``failure_path`` files of this attempt, lowest rank first."""
        found = self.run_dir.glob(f"attempt-{self.attempt}.rank-*.failed.json")
        return sorted(found, key=lambda path: int(path.name.split(".")[1].removeprefix("rank-")))
