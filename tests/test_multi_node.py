"""One run across two "machines" through DeepSpeed's multi-node runner, as docs/scale.md "Several machines, one
run" sets it up: a real sshd on a loopback port, two ssh host names for it, pdsh, and ``orch worker --hostfile``.
What it cannot show without a second machine: NCCL between nodes, ``hostname -I``, shared storage."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from orchestrator.store import Store
from tests.conftest import free_port, installed_or_skip, orch, training_processes, wait_until

pytestmark = pytest.mark.slow

SMALL = ["--encoder", "vit:depth=1,width=64,embed_dim=64", "--text-encoder",
         "text-transformer:depth=1,width=64,embed_dim=64", "--batch-size", "64", "--gpus", "all"]
NODES = ("orchnode1", "orchnode2")


@dataclass
class Nodes:
    env: dict[str, str]  # for orch: ssh that knows the node names, and the store away from the working folder
    store_url: str
    sshd_log: Path


@pytest.fixture
def nodes(workdir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    """sshd on 127.0.0.1 under two host names (both "nodes" are this machine), reachable without a password by
    ``ssh`` and pdsh through a PATH entry that gives ssh this test's client config; the store is an absolute
    SQLite URL outside the working folder, so that the remote ranks find it only through the exported
    ``ORCH_STORE``."""
    sshd, pdsh = installed_or_skip("sshd", "openssh-server"), installed_or_skip("pdsh", "pdsh")
    if os.geteuid() != 0:
        pytest.skip("sshd needs root here (privilege separation); CI runs as root")
    ssh = installed_or_skip("ssh", "openssh-client")
    home = tmp_path_factory.mktemp("ssh")
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / key)], check=True)
    shutil.copy(home / "user_key.pub", home / "authorized_keys")
    port = free_port()
    (home / "sshd_config").write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {home}/host_key\nAuthorizedKeysFile {home}/authorized_keys\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        f"StrictModes no\nUsePAM no\nPidFile {home}/sshd.pid\n")
    (home / "ssh_config").write_text(
        f"Host {' '.join(NODES)}\n  HostName 127.0.0.1\n  Port {port}\n  IdentityFile {home}/user_key\n"
        "  IdentitiesOnly yes\n  BatchMode yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n"
        "  LogLevel ERROR\n")
    bin_dir = home / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nexec {ssh} -F {home}/ssh_config "$@"\n')
    (bin_dir / "ssh").chmod(0o755)
    Path("/run/sshd").mkdir(exist_ok=True)  # Debian's sshd refuses to start without it
    log = home / "sshd.log"
    with log.open("w") as out:
        daemon = subprocess.Popen([sshd, "-D", "-e", "-f", str(home / "sshd_config")], stderr=out)
    env = {"PATH": f"{bin_dir}:{Path(pdsh).parent}:{os.environ['PATH']}"}
    try:
        wait_until(lambda: daemon.poll() is not None or subprocess.run(
            ["ssh", NODES[1], "true"], env={**os.environ, **env}, capture_output=True).returncode == 0,
            30, "sshd to accept the test key")
        assert daemon.poll() is None, log.read_text()
        store_dir = tmp_path_factory.mktemp("shared-store")
        store_url = f"sqlite:///{store_dir}/experiments.db"
        (workdir / "hosts").write_text("".join(f"{node} slots=1\n" for node in NODES))
        yield Nodes({**env, "ORCH_STORE": store_url}, store_url, log)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def _is_rank(cmdline: list[str]) -> bool:
    """A training process itself, not the launcher, pdsh or ssh whose command lines also name the module."""
    return cmdline[cmdline.index("orchestrator.engine.train") - 1] == "-m"


def test_a_run_trains_on_two_nodes_over_pdsh_and_ssh(workdir: Path, nodes: Nodes) -> None:
    assert orch("queue", *SMALL, "--steps", "6", "--checkpoint-every", "3", cwd=workdir, env=nodes.env).returncode == 0
    result = orch("worker", "--hostfile", "hosts", "--master-addr", "127.0.0.1", cwd=workdir, env=nodes.env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "run 1 finished" in result.stdout
    store = Store.open(nodes.store_url)
    assert store.run(1)["status"] == "finished"
    assert "zs/top1" in store.final_metrics(1)
    checkpoint = Path(store.latest_checkpoint(1)["path"])
    assert store.latest_checkpoint(1)["step"] == 6
    assert (checkpoint / "rank0.pt").exists() and (checkpoint / "rank1.pt").exists()  # one rank per node saved
    log = (workdir / "runs" / "1" / "attempt-1.log").read_text()
    assert f"pdsh -S -f 1024 -w {','.join(NODES)}" in log  # DeepSpeed's runner, not torchrun
    assert f"export ORCH_STORE={nodes.store_url}" in log  # what only the exported env file carries
    # DeepSpeed's ssh check of the first host, then one pdsh session per node.
    assert nodes.sshd_log.read_text().count("Accepted publickey") >= 3
    assert not (workdir / "experiments.db").exists()  # no rank fell back to the default store


def test_cancel_stops_the_ranks_on_every_node(workdir: Path, nodes: Nodes) -> None:
    assert orch("queue", *SMALL, "--steps", "2000", "--log-every", "2", cwd=workdir, env=nodes.env).returncode == 0
    store = Store.open(nodes.store_url)
    worker = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker", "--hostfile", "hosts",
                               "--master-addr", "127.0.0.1", "--quiet"], cwd=workdir, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, **nodes.env})
    run_dir = workdir / "runs" / "1"
    wait_until(lambda: store.progress(1).get("step", 0) >= 4, 300, "run 1 to train on both nodes")
    ranks = [p for p in training_processes(run_dir) if _is_rank(p.info["cmdline"])]
    assert len(ranks) == 2, [p.info["cmdline"] for p in ranks]  # one per node
    for rank in ranks:  # started on the "node" by sshd, not by this machine's worker
        ancestors = rank.parents()
        assert any(p.name() == "sshd" for p in ancestors) and worker.pid not in {p.pid for p in ancestors}
    assert "its worker stops it" in orch("cancel", "1", cwd=workdir, env=nodes.env).stdout
    out, _ = worker.communicate(timeout=300)
    assert worker.returncode == 0 and "run 1 cancelled" in out
    assert store.run(1)["status"] == "cancelled"
    wait_until(lambda: not training_processes(run_dir), 60, "the ranks on both nodes to exit")
    assert store.progress(1)["step"] < 2000


def test_a_stopped_worker_has_both_nodes_checkpoint_the_run(workdir: Path, nodes: Nodes) -> None:
    """SIGTERM to the worker: the stop request reaches the rank on the other node through the per-step stop vote,
    both ranks save the same step and exit, and the run is queued again from that checkpoint."""
    assert orch("queue", *SMALL, "--steps", "2000", "--log-every", "2", "--checkpoint-every", "0", cwd=workdir,
                env=nodes.env).returncode == 0
    store = Store.open(nodes.store_url)
    worker = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "worker", "--hostfile", "hosts",
                               "--master-addr", "127.0.0.1", "--checkpoint-on-stop", "60", "--quiet"], cwd=workdir,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, **nodes.env})
    run_dir = workdir / "runs" / "1"
    wait_until(lambda: store.progress(1).get("step", 0) >= 4, 300, "run 1 to train on both nodes")
    worker.terminate()
    out, _ = worker.communicate(timeout=300)
    assert worker.returncode == 143, out
    checkpoint = store.latest_checkpoint(1)
    assert checkpoint and checkpoint["step"] >= 4, checkpoint
    assert (Path(checkpoint["path"]) / "rank0.pt").exists() and (Path(checkpoint["path"]) / "rank1.pt").exists()
    assert f"resumed from step {checkpoint['step']} by the next worker" in out
    assert store.run(1)["status"] == "queued"
    wait_until(lambda: not training_processes(run_dir), 60, "the ranks on both nodes to exit")
