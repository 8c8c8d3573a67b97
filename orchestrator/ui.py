"""``orch ui``: the MLflow UI over the tracking store that orch's MLflow tracker writes to.

The store is resolved exactly as the tracker resolves it (plugins/trackers/mlflow.py): ``MLFLOW_TRACKING_URI``
when set, else ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlruns``. When the tracking URI is
an http(s) server, its UI is already there: we only print its address. Otherwise we run
``python -m mlflow server`` in the foreground (mlflow is never imported here: ``orch --help`` stays fast).
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import UserError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
START_TIMEOUT = 120.0  # seconds to wait for the server to answer (it usually takes 5-10 s)


@dataclass(frozen=True)
class TrackingStore:
    """Where runs are tracked: a backend store URI and, for a local store, the default artifact root."""

    uri: str
    artifact_root: str | None = None

    @property
    def is_server(self) -> bool:
        return self.uri.lower().startswith(("http://", "https://"))


def tracking_store(cwd: Path | None = None, environ: dict[str, str] | None = None) -> TrackingStore:
    """The store orch's MLflow tracker writes to, from this working directory and environment."""
    env = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    mlruns = (cwd / "mlruns").resolve().as_uri()
    uri = env.get("MLFLOW_TRACKING_URI")
    if not uri:
        return TrackingStore(f"sqlite:///{(cwd / 'mlflow.db').resolve()}", mlruns)
    if uri.lower().startswith(("http://", "https://")):
        return TrackingStore(uri.rstrip("/"))
    # A database URI: the tracker's client puts new experiments' artifacts in <cwd>/mlruns, as MLflow does.
    return TrackingStore(uri, mlruns)


def _url_host(host: str) -> str:
    """``host`` as it goes into a URL (IPv6 in brackets); a wildcard address becomes the loopback one."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]"
    except ValueError:
        pass
    return host


def allowed_hosts(host: str, port: int) -> str:
    """The ``--allowed-hosts`` list (Host headers accepted by MLflow's DNS-rebinding guard).

    Loopback names always; the bound address when it is a specific one; this machine's names when bound
    to every interface. Each with and without the port, since browsers send ``Host: name:port``.
    """
    names = list(LOOPBACK_NAMES)
    if host in ("0.0.0.0", "::", ""):
        names += [socket.gethostname(), socket.getfqdn()]
    else:
        names.append(_url_host(host))
    out: list[str] = []
    for name in names:
        for entry in (name, f"{name}:{port}"):
            if name and entry not in out:
                out.append(entry)
    return ",".join(out)


def server_command(store: TrackingStore, host: str, port: int, hosts: str | None = None,
                   workers: int = 1) -> list[str]:
    """The ``mlflow server`` command line serving the UI over ``store``."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store.uri,
           "--host", host, "--port", str(port), "--workers", str(workers),
           "--allowed-hosts", hosts or allowed_hosts(host, port)]
    if store.artifact_root:
        cmd += ["--default-artifact-root", store.artifact_root]
    return cmd


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def wait_until_up(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll ``url``/health until it answers 200, the deadline passes or ``alive()`` turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.3)
    return False


def serve(host: str, port: int, hosts: str | None = None, echo: Callable[[str], None] = print) -> int:
    """Run the MLflow UI in the foreground until Ctrl-C; returns the exit code for ``orch ui``."""
    store = tracking_store()
    if store.is_server:
        echo(f"MLflow tracking server (MLFLOW_TRACKING_URI): open {store.uri}")
        return 0
    if not _port_free(host, port):
        raise UserError(f"port {port} on {host} is in use (is `orch ui` already running?): pass --port")
    url = f"http://{_url_host(host)}:{port}"
    echo(f"MLflow UI over {store.uri}" + (f" (artifacts {store.artifact_root})" if store.artifact_root else ""))
    if store.uri.startswith("sqlite:///") and not Path(store.uri.removeprefix("sqlite:///")).exists():
        echo("no runs tracked here yet (run orch in this folder, or set MLFLOW_TRACKING_URI): the UI starts empty")
    if host not in ("127.0.0.1", "localhost", "::1"):
        echo(f"warning: listening on {host}: anyone who can reach this machine can read and edit the runs")
    # Its own session: a Ctrl-C reaches the server once, through us, and we can stop all its processes.
    proc = subprocess.Popen(server_command(store, host, port, hosts), env=server_env(), start_new_session=True)
    # SIGINT too: a shell that starts us in the background without job control leaves it ignored.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        if wait_until_up(url, START_TIMEOUT, alive=lambda: proc.poll() is None):
            echo(f"open {url}  (Ctrl-C stops it)")
        elif proc.poll() is None:
            echo(f"the server has not answered yet; it should appear at {url}")
        code = proc.wait()
    except KeyboardInterrupt:
        stop(proc)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code != 0:
        echo(f"error: mlflow server exited with code {code} (its messages are above)")
    return code


def server_env() -> dict[str, str]:
    """The server's environment: no LLM-judge job runner (seven extra processes) unless asked for."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a server started in its own session: SIGINT (graceful), then SIGKILL to its whole group."""
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever it left behind (uvicorn, job runners)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
