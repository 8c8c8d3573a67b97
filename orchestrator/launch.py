"""How many training processes a run gets, and the command that starts them: the process itself when there
is one, torchrun for several on this machine, or DeepSpeed's multi-node runner over a hostfile. Imports no
torch: the worker decides before any rank starts.

``--gpus`` counts training processes: one per GPU, or gloo processes on a machine without CUDA GPUs.
``all`` means every GPU this worker may use (every visible GPU, or ``orch worker --gpus N``'s N), decided at
launch time; with ``orch worker --hostfile`` it means every slot of every host.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from orchestrator.errors import UserError

ALL = "all"
# set for ranks on one machine: SIGTERM to a rank asks for a checkpoint within two steps (engine/train.py)
CHECKPOINT_ON_SIGTERM = "ORCH_CHECKPOINT_ON_SIGTERM"
STALL_TIMEOUT = "ORCH_STALL_TIMEOUT"  # the worker's --stall-timeout, in seconds, for the ranks
Gpus = int | Literal["all"]
_HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


def die_with_parent(signum: int) -> None:
    """Have the kernel send this process ``signum`` when its parent dies (PR_SET_PDEATHSIG), so that no training
    process outlives the one that started it, even when that one dies by SIGKILL."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signum)


def parse_gpus(text: str) -> Gpus:
    """``"all"`` or a positive integer, as ``orch worker --gpus`` takes it."""
    value = text.strip().lower()
    if value == ALL:
        return ALL
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"--gpus {text!r} is neither a number nor 'all': write --gpus 2 or --gpus all") from None
    if number < 1:
        raise UserError(f"--gpus must be at least 1 (or all), got {number}")
    return number


@functools.cache
def visible_gpus() -> int:
    """CUDA GPUs the training processes will see, without importing torch: ``nvidia-smi -L`` narrowed by
    ``CUDA_VISIBLE_DEVICES``; only without nvidia-smi on a machine with the NVIDIA driver, torch in a subprocess."""
    listed = _nvidia_smi_count()
    if listed is None:
        if not Path("/proc/driver/nvidia").exists():
            return 0
        listed = _torch_count()
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return listed
    entries = [e.strip() for e in mask.split(",")]
    count = 0
    for entry in entries:  # CUDA stops at the first entry it cannot use
        if not entry or entry.startswith("-") or (entry.isdigit() and int(entry) >= listed):
            break
        count += 1
    return min(count, listed)


def _nvidia_smi_count() -> int | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:  # a driver problem: nvidia-smi says so, training would fail the same way
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def _torch_count() -> int:
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                             capture_output=True, text=True, timeout=120)
        return int(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return 0


def worker_devices(gpus: Gpus | None) -> int | None:
    """What a worker may use: its GPUs, or on a CPU-only machine a number of gloo processes; None when nothing
    limits it (a CPU-only machine and no ``--gpus``). One clear line when ``--gpus`` asks for more than is there."""
    present = visible_gpus()
    if gpus == ALL:
        if not present:
            raise UserError("--gpus all: no CUDA GPU is visible on this machine (nvidia-smi -L, CUDA_VISIBLE_DEVICES); "
                            "on the CPU give the number of gloo processes instead, e.g. --gpus 2")
        return present
    if gpus is None:
        return present or None
    if present and gpus > present:
        raise UserError(f"--gpus {gpus}: this machine has {present} visible GPU(s); use --gpus {present} or --gpus all")
    return gpus


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """DeepSpeed's hostfile (``HOST slots=N`` per line, ``#`` comments), checked here so that a mistake is one line."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UserError(f"--hostfile {path}: cannot read it ({exc.strerror or exc})") from None
    hosts: list[tuple[str, int]] = []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = _HOST_LINE.match(line)
        if not match or int(match.group(2)) < 1:
            raise UserError(f"--hostfile {path}, line {number}: {line!r} is not 'HOST slots=N' (N >= 1)")
        if any(host == match.group(1) for host, _ in hosts):
            raise UserError(f"--hostfile {path}, line {number}: host {match.group(1)} is listed twice")
        hosts.append((match.group(1), int(match.group(2))))
    if not hosts:
        raise UserError(f"--hostfile {path} lists no hosts: write one 'HOST slots=N' line per machine")
    return hosts


def is_this_machine(host: str) -> bool:
    """Whether a hostfile name is this machine (rank 0 and the rendezvous port are on the first host)."""
    if host in ("localhost", "127.0.0.1", "::1"):
        return True
    names = {socket.gethostname(), socket.getfqdn(), socket.gethostname().split(".")[0]}
    if host in names:
        return True
    try:
        return host in socket.gethostbyname_ex(socket.gethostname())[2] or \
            socket.gethostbyname(host) in socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        return False


@dataclass(frozen=True)
class Launch:
    """The processes of one attempt: on this machine alone, or across the hostfile's hosts."""

    processes: int
    hosts: list[tuple[str, int]] | None = None  # None: this machine

    @property
    def alone(self) -> bool:
        """One process on this machine: started without a launcher (``command``, ``environment``)."""
        return self.processes == 1 and self.hosts is None

    @property
    def multi_node(self) -> bool:
        return self.hosts is not None


def plan(run_gpus: Gpus, batch_size: int, accum: int, devices: int | None,
         hosts: list[tuple[str, int]] | None = None) -> Launch:
    """How many processes the run gets here, or one line saying why it cannot run on this worker."""
    total = sum(slots for _, slots in hosts) if hosts else 0
    if hosts and run_gpus in (ALL, total):
        launch = Launch(total, hosts if len(hosts) > 1 else None)  # one host: no ssh
    elif run_gpus == ALL:
        if devices is None:
            raise UserError("the run asks for --gpus all but no CUDA GPU is visible on this machine: on the CPU "
                            "queue it with a number of gloo processes (--gpus 2), or start the worker with --gpus N")
        launch = Launch(devices)
    else:
        if devices is not None and run_gpus > devices:
            where = f"this worker has {devices}" + (f" (and its hostfile {total} slots)" if hosts else "")
            raise UserError(f"the run asks for --gpus {run_gpus} but {where}: queue it with --gpus all or "
                            f"--gpus {devices}, or let a worker with more GPUs claim it")
        launch = Launch(run_gpus)
    if batch_size % (launch.processes * accum):
        raise UserError(f"--batch-size {batch_size} is not divisible by {launch.processes} processes x --accum "
                        f"{accum}: queue it with a batch size that is a multiple of {launch.processes * accum}")
    return launch


def environment(launch: Launch) -> dict[str, str]:
    """The variables a launcher would set, for the one process ``command`` starts without one. A lone rank
    needs no rendezvous (the engine gives it an in-memory process group), and skipping torchrun's agent saves
    its 4 s start on every run; DeepSpeed still looks for the variables, so they are all there."""
    if not launch.alone:
        return {}
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}


def command(launch: Launch, train_args: list[str], hostfile: Path | None = None, master_port: int | None = None,
            master_addr: str | None = None) -> list[str]:
    """The launcher command line: the training process itself when it is the only one (with ``environment``),
    torchrun for several here, or ``deepspeed --hostfile`` (pdsh over ssh) across machines."""
    if launch.alone:
        return [sys.executable, "-m", "orchestrator.engine.train", *train_args]
    if not launch.multi_node:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={launch.processes}",
                "-m", "orchestrator.engine.train", *train_args]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_local_rank",
           "--module"]
    if master_port:
        cmd.append(f"--master_port={master_port}")
    if master_addr:
        cmd.append(f"--master_addr={master_addr}")
    return [*cmd, "orchestrator.engine.train", *train_args]
