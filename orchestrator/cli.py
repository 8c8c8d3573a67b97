"""The ``orch`` command line. Imports nothing heavy at module level: torch, deepspeed and mlflow only
load in the training processes, so ``orch --help``, ``ls``, ``show``, ``plugins`` and ``queue`` start fast.

A user's mistake is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from orchestrator.errors import UserError

COMPONENT_FLAGS = [
    ("data", "dataset (default mnist)"),
    ("encoder", "image tower, or one shared by both modalities (default vit)"),
    ("text_encoder", "text tower, when the loss needs one (default text-transformer)"),
    ("loss", "training objective (default infonce)"),
    ("sampler", "batch construction (default random)"),
    ("eval", "evaluator; repeat for several per run (default zs with a text tower, else knn)"),
]


def _run_options(func: Any) -> Any:
    """The flags shared by ``queue`` and ``run``: components, then every trainer option."""
    from orchestrator.trainer import TRAINER_OPTIONS

    for option in reversed(TRAINER_OPTIONS):
        default = "tenth of --steps" if option.name == "warmup" else option.default
        func = click.option(f"--{option.name.replace('_', '-')}", option.name, multiple=True,
                            help=f"{option.type_name} (default {default}); repeat for a grid")(func)
    for flag, help_text in reversed(COMPONENT_FLAGS):
        func = click.option(f"--{flag.replace('_', '-')}", flag, multiple=True, metavar="NAME[:k=v,...]",
                            help=help_text + ("" if flag == "eval" else "; repeat for a grid"))(func)
    func = click.option("--name", default=None, help="run name (default: components and changed options)")(func)
    func = click.option("--priority", default=0, type=int, help="higher runs first (default 0)")(func)
    func = click.option("--max-attempts", default=3, type=click.IntRange(1), show_default=True,
                        help="attempts before a run that keeps failing is marked failed")(func)
    func = click.option("--again", is_flag=True, help="queue even if a run with the same spec exists")(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--store", envvar="ORCH_STORE", default=None, metavar="URL",
              help="SQLAlchemy URL of the experiment store [env ORCH_STORE; default sqlite:///experiments.db]")
@click.option("--runs-dir", envvar="ORCH_RUNS_DIR", default=None, metavar="DIR",
              help="where checkpoints, logs and final weights go [env ORCH_RUNS_DIR; default ./runs]")
@click.pass_context
def cli(ctx: click.Context, store: str | None, runs_dir: str | None) -> None:
    """orch: queue, run, resume and compare contrastive pre-training experiments."""
    ctx.obj = {"store": store, "runs_dir": runs_dir}


def _store(ctx: click.Context):  # noqa: ANN202 - Store, imported lazily
    from orchestrator.store import Store

    return Store.open(ctx.obj["store"])


# --- queueing and running --------------------------------------------------------------------------

def _queue(ctx: click.Context, kwargs: dict[str, Any]) -> list[int]:
    from orchestrator.registry import Registry
    from orchestrator.spec import SLOTS, TRAINER_OPTIONS, expand_grid

    registry = Registry.load()
    choices = {slot: list(kwargs[slot]) for slot in SLOTS}
    choices = {slot: values for slot, values in choices.items() if values}
    trainer = {o.name: list(kwargs[o.name]) for o in TRAINER_OPTIONS if kwargs[o.name]}
    runs = expand_grid(registry, choices, trainer, kwargs["name"])
    store = _store(ctx)
    new, seen = [], set()
    for run in runs:
        if run.hash in seen:
            continue
        seen.add(run.hash)
        existing = store.find_by_hash(run.hash)
        if existing and not kwargs["again"]:
            click.echo(f"run {existing['id']} ({existing['status']}) already has this spec ({run.name}, "
                       f"{run.hash[:12]}): not queued; pass --again to queue it anyway")
            continue
        new.append(run)
    ids = store.add_runs([(r.spec, r.hash, r.name) for r in new], priority=kwargs["priority"],
                         max_attempts=kwargs["max_attempts"])
    for run_id, run in zip(ids, new):
        click.echo(f"queued run {run_id}: {run.name} ({run.hash[:12]})")
    return ids


@cli.command()
@_run_options
@click.pass_context
def queue(ctx: click.Context, **kwargs: Any) -> None:
    """Queue runs: every flag is NAME[:key=value,...]; a repeated flag queues the grid."""
    _queue(ctx, kwargs)


_checkpoint_on_stop = click.option(
    "--checkpoint-on-stop", default=20.0, type=click.FloatRange(min=0), show_default=True, metavar="SECONDS",
    help="told to stop (SIGTERM, Ctrl-C), give the run this long to save a checkpoint (within two steps) before "
         "its processes are stopped; 0 stops them at once")
_stall_timeout = click.option(
    "--stall-timeout", default=0.0, type=click.FloatRange(min=0), show_default=True, metavar="SECONDS",
    help="stop an attempt that shows no progress (no step, no evaluation batch) for this long, with each rank's "
         "Python stack in its log, and retry it; longer than the slowest start-up or checkpoint save; 0: never")


@cli.command()
@_run_options
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--lease", default=60.0, type=click.FloatRange(min=2), show_default=True, help="lease in seconds")
@_checkpoint_on_stop
@_stall_timeout
@click.pass_context
def run(ctx: click.Context, quiet: bool, lease: float, checkpoint_on_stop: float, stall_timeout: float,
        **kwargs: Any) -> None:
    """Queue runs and execute them now, in the foreground."""
    from orchestrator.worker import Worker, runs_dir

    ids = _queue(ctx, kwargs)
    worker = Worker(_store(ctx), runs_dir(ctx.obj["runs_dir"]), lease_seconds=lease, quiet=quiet, echo=click.echo,
                    checkpoint_on_stop=checkpoint_on_stop, stall_timeout=stall_timeout)
    worker.stop_on_signals()
    for run_id in ids:
        while worker.stop_signal is None and (claim := worker.store.claim(worker.id, lease, run_id=run_id)):
            if worker.execute(claim) != "queued":  # queued again: a crash with attempts left, or interrupted
                break
        else:
            if worker.stop_signal is None:
                click.echo(f"run {run_id} was taken by another worker")
    if worker.stop_signal is not None:
        sys.exit(128 + worker.stop_signal)
    outcomes = [worker.store.attempts(i)[-1]["outcome"] if worker.store.attempts(i) else "none" for i in ids]
    if "failed" in outcomes:  # a reason the user can act on (bad data, diverged loss, full disk)
        sys.exit(2)
    if any(o != "finished" for o in outcomes):
        sys.exit(1)


@cli.command()
@click.option("--once", is_flag=True, help="execute one run, then stop")
@click.option("--forever", is_flag=True, help="keep polling for new runs instead of stopping when the queue is empty")
@click.option("--lease", default=60.0, type=click.FloatRange(min=2), show_default=True,
              help="seconds a run stays ours without a heartbeat")
@click.option("--poll", default=5.0, type=click.FloatRange(min=0.1), show_default=True, help="seconds between polls")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--gpus", default=None, metavar="N|all",
              help="GPUs this worker uses (default: every visible one; on a CPU-only machine, any number of gloo "
                   "processes); runs queued with --gpus all get them all")
@click.option("--hostfile", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="DeepSpeed hostfile ('HOST slots=N' lines, this machine first): runs asking for --gpus all (or "
                   "for every slot) train across these machines, launched by DeepSpeed's runner over pdsh/ssh")
@click.option("--master-addr", default=None, metavar="ADDR",
              help="with --hostfile: the address the other hosts reach this machine at (default: DeepSpeed asks "
                   "the first host for `hostname -I`)")
@_checkpoint_on_stop
@_stall_timeout
@click.pass_context
def worker(ctx: click.Context, once: bool, forever: bool, lease: float, poll: float, quiet: bool, gpus: str | None,
           hostfile: Path | None, master_addr: str | None, checkpoint_on_stop: float, stall_timeout: float) -> None:
    """Claim queued runs and execute them (resuming runs whose worker died)."""
    from orchestrator.launch import parse_gpus
    from orchestrator.worker import Worker, runs_dir

    w = Worker(_store(ctx), runs_dir(ctx.obj["runs_dir"]), lease_seconds=lease, quiet=quiet, echo=click.echo,
               gpus=parse_gpus(gpus) if gpus is not None else None, hostfile=hostfile, master_addr=master_addr,
               checkpoint_on_stop=checkpoint_on_stop, stall_timeout=stall_timeout)
    w.stop_on_signals()
    done = w.loop(once=once, forever=forever, poll_seconds=poll)
    if w.stop_signal is not None:
        click.echo(f"worker {w.id}: executed {done} run(s); stopped by {signal.Signals(w.stop_signal).name}")
        sys.exit(128 + w.stop_signal)
    left = f"; left {len(w.left)} run(s) it cannot run ({', '.join(map(str, sorted(w.left)))})" if w.left else ""
    click.echo(f"worker {w.id}: executed {done} run(s){left}" + ("" if once else "; the queue is empty"))


@cli.command()
@click.argument("run_ids", type=int, nargs=-1, required=True)
@click.pass_context
def sync(ctx: click.Context, run_ids: tuple[int, ...]) -> None:
    """Send runs' stored metrics and status to the trackers (MLflow) again, e.g. after an outage."""
    from orchestrator.worker import Worker, runs_dir

    w = Worker(_store(ctx), runs_dir(ctx.obj["runs_dir"]), quiet=True, echo=click.echo)
    for run_id in run_ids:
        click.echo(f"run {run_id}: replayed {w.sync(run_id)} logged steps to the trackers")


# --- looking at runs -----------------------------------------------------------------------------

def _fmt_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M") if value else ""


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


def _headline(metrics: dict[str, float]) -> str:
    evals = {k: v for k, v in metrics.items() if not k.startswith("train/")}
    if evals:
        key = sorted(evals)[0]
        return f"{key} {evals[key]:.2f}"
    return f"loss {metrics['train/loss']:.4f}" if "train/loss" in metrics else ""


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    """Aligned columns, header in bold on a terminal; plain text so that ``ls`` needs no rich import."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    click.echo(click.style(lines[0], bold=True) if sys.stdout.isatty() else lines[0])
    for line in lines[1:]:
        click.echo(line)


@cli.command(name="ls")
@click.option("--status", "statuses", multiple=True,
              type=click.Choice(["queued", "running", "finished", "failed", "cancelled"]), help="only these")
@click.option("--limit", default=50, type=click.IntRange(0), show_default=True, help="0 for all")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def ls(ctx: click.Context, statuses: tuple[str, ...], limit: int, as_json: bool) -> None:
    """List runs, newest first."""
    store = _store(ctx)
    runs = store.runs(statuses, limit)
    metrics = store.final_metrics_of([r["id"] for r in runs])
    if as_json:
        out = [{**_jsonable({k: v for k, v in r.items() if k != "spec"}), "metrics": metrics.get(r["id"], {})}
               for r in runs]
        click.echo(json.dumps(out, indent=2))
        return
    if not runs:
        click.echo("no runs yet: try `orch run` or `orch queue`")
        return
    _table(["id", "status", "name", "attempt", "result", "created", "hash"],
           [[r["id"], r["status"], r["name"], r["attempt"], _headline(metrics.get(r["id"], {})),
             _fmt_time(r["created_at"]), r["spec_hash"][:12]] for r in runs])


@cli.command()
@click.argument("run_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.pass_context
def show(ctx: click.Context, run_id: int, as_json: bool) -> None:
    """Show a run: its resolved spec, attempts, checkpoints and final metrics."""
    from orchestrator.options import mapping_text, masked

    store = _store(ctx)
    run = store.run(run_id)
    run["spec"] = masked(run["spec"])
    attempts = store.attempts(run_id)
    metrics = store.final_metrics(run_id)
    checkpoint = store.latest_checkpoint(run_id)
    if as_json:
        click.echo(json.dumps({**_jsonable(run), "attempts": [_jsonable(a) for a in attempts], "metrics": metrics,
                               "checkpoint": checkpoint}, indent=2))
        return
    click.echo(f"run {run['id']}: {run['name']}  [{run['status']}]")
    click.echo(f"  hash {run['spec_hash']}  priority {run['priority']}  created {_fmt_time(run['created_at'])}")
    if run["error"]:
        click.echo(f"  error: {run['error']}")
    spec = run["spec"]
    for slot in ("data", "encoder", "text_encoder", "loss", "sampler"):
        if spec.get(slot):
            opts = ", ".join(f"{k}={v}" for k, v in spec[slot]["options"].items())
            click.echo(f"  {slot:<12} {spec[slot]['name']} ({opts})  [{spec[slot]['plugin']['distribution']} "
                       f"{spec[slot]['plugin']['version']}]")
    for entry in spec["eval"]:
        opts = ", ".join(f"{k}={v}" for k, v in entry["options"].items())
        click.echo(f"  {'eval':<12} {entry['name']} ({opts})")
    click.echo("  trainer      " + ", ".join(f"{k}={mapping_text(v) if isinstance(v, dict) else v}"
                                          for k, v in spec["trainer"].items()))
    for a in attempts:
        click.echo(f"  attempt {a['number']}: {a['outcome']} on {a['worker']} from {_fmt_time(a['started_at'])}"
                   + (f": {a['error']}" if a["error"] else ""))
    if checkpoint:
        click.echo(f"  checkpoint   step {checkpoint['step']}: {checkpoint['path']}")
    for key, value in sorted(metrics.items()):
        click.echo(f"  {key:<24} {value:.4f}")


@cli.command()
@click.argument("run_id", type=int)
@click.option("-f", "--follow", is_flag=True, help="keep printing new lines until the run stops running")
@click.option("--attempt", type=click.IntRange(1), default=None, help="which attempt (default: the latest)")
@click.pass_context
def logs(ctx: click.Context, run_id: int, follow: bool, attempt: int | None) -> None:
    """Print a run's log: what its training processes wrote, kept per attempt (runs/ID/attempt-N.log)."""
    import time

    from orchestrator.worker import runs_dir

    store = _store(ctx)
    run = store.run(run_id)
    numbers = [a["number"] for a in store.attempts(run_id)]
    if not numbers:
        raise UserError(f"run {run_id} has no log yet: it is {run['status']} and has not started")
    if attempt is None:
        attempt = numbers[-1]
    elif attempt not in numbers:
        raise UserError(f"run {run_id} has no attempt {attempt}: its attempts are {', '.join(map(str, numbers))}")
    path = runs_dir(ctx.obj["runs_dir"]) / str(run_id) / f"attempt-{attempt}.log"
    if not path.is_file():
        raise UserError(f"there is no log at {path} (yet): if the run's worker keeps its runs elsewhere, "
                        f"pass --runs-dir or set ORCH_RUNS_DIR")
    out = sys.stdout.buffer
    with path.open("rb") as log:
        out.write(log.read())
        out.flush()
        try:
            while follow and _attempt_running(store, run_id, attempt):
                time.sleep(0.5)
                out.write(log.read())
                out.flush()
        except KeyboardInterrupt:
            return
        out.write(log.read())  # whatever was written between the last read and the end
        out.flush()


def _attempt_running(store: Any, run_id: int, attempt: int) -> bool:
    """The run is running, and this attempt is its current one (a requeued run starts another log)."""
    return store.run(run_id)["status"] == "running" and store.attempts(run_id)[-1]["number"] == attempt


@cli.command()
@click.argument("run_id", type=int)
@click.pass_context
def cancel(ctx: click.Context, run_id: int) -> None:
    """Cancel a queued or running run (a running one is stopped by its worker)."""
    previous = _store(ctx).cancel(run_id)
    click.echo(f"run {run_id} cancelled" + (" (its worker stops it at the next heartbeat)" if previous == "running"
                                            else ""))


@cli.command()
@click.argument("run_id", type=int)
@click.option("--gpus", type=click.IntRange(1), default=None, metavar="N",
              help="resume on N training processes instead (GPUs, or gloo processes on the CPU); same global batch")
@click.pass_context
def resume(ctx: click.Context, run_id: int, gpus: int | None) -> None:
    """Queue a failed or cancelled run again; it resumes from its last valid checkpoint."""
    store = _store(ctx)
    store.resume(run_id, gpus=gpus)
    checkpoint = store.latest_checkpoint(run_id)
    where = f"from step {checkpoint['step']}" if checkpoint else "from the start"
    on = f" on {gpus} process(es)" if gpus else ""
    click.echo(f"run {run_id} queued again; a worker resumes it {where}{on}")


@cli.command()
@click.argument("run_ids", type=int, nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, metavar="PNG",
              help="also draw their loss and metric curves into this PNG file")
@click.pass_context
def compare(ctx: click.Context, run_ids: tuple[int, ...], as_json: bool, plot: str | None) -> None:
    """Final metrics of runs side by side, with the options in which their specs differ."""
    from orchestrator.options import masked

    store = _store(ctx)
    runs = [{**r, "spec": masked(r["spec"])} for r in (store.run(i) for i in run_ids)]
    if plot:
        _plot_curves(runs, {r["id"]: store.metrics(r["id"]) for r in runs}, plot)
        click.echo(f"wrote {plot}", err=as_json)
    metrics = {r["id"]: store.final_metrics(r["id"]) for r in runs}
    flat = {r["id"]: _flatten(r["spec"]) for r in runs}
    keys = sorted(set().union(*flat.values()))
    differences = {k: {i: flat[i].get(k) for i in flat} for k in keys
                   if len({json.dumps(flat[i].get(k)) for i in flat}) > 1}
    if as_json:
        click.echo(json.dumps({"runs": [{"id": r["id"], "name": r["name"], "status": r["status"],
                                         "metrics": metrics[r["id"]]} for r in runs],
                               "differences": differences}, indent=2))
        return
    names = sorted(set().union(*metrics.values()))
    rows = [[name] + [f"{metrics[r['id']][name]:.4f}" if name in metrics[r["id"]] else "-" for r in runs]
            for name in names]
    rows += [[key] + [str(values[r["id"]]) for r in runs] for key, values in differences.items()]
    _table(["", *[f"run {r['id']}" for r in runs]], [["status", *[r["status"] for r in runs]], *rows])


def _plot_curves(runs: list[dict[str, Any]], series: dict[int, list[dict[str, Any]]], path: str) -> None:
    """One subplot per metric (train/loss first, then evaluations, then other training scalars), one line per run.

    matplotlib is imported here, and drives Agg through a bare Figure (no pyplot, no display): plain
    ``orch compare`` stays fast and --plot works on a headless worker.
    """
    names = {row["name"] for rows in series.values() for row in rows}
    if not names:
        raise UserError(f"run(s) {', '.join(str(r['id']) for r in runs)} have logged no metrics yet: nothing to plot")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib") from None
    runs = list({r["id"]: r for r in runs}.values())  # a run named twice is drawn once
    lo = min(row["step"] for rows in series.values() for row in rows)
    hi = max(row["step"] for rows in series.values() for row in rows)
    pad = max((hi - lo) * 0.03, 0.5)  # one x range for all: a final eval sits at the end
    order = sorted(names, key=lambda n: (n != "train/loss", n.startswith("train/"), n))
    cols = min(3, len(order))
    rows = -(-len(order) // cols)
    fig = Figure(figsize=(5 * cols, 3.4 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, name in zip(axes, order):
        for i, run in enumerate(runs):
            points = [(r["step"], r["value"]) for r in series[run["id"]] if r["name"] == name]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, color=f"C{i % 10}", label=f"run {run['id']}: {run['name']}",
                        marker="o" if len(points) <= 20 else None, markersize=4)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(lo - pad, hi + pad)
        ax.grid(alpha=0.3)
    for ax in axes[len(order):]:
        ax.set_visible(False)
    handles: dict[str, Any] = {}  # one legend entry per run, even when a run lacks some metric
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(len(handles), 2))
    try:
        fig.savefig(path, dpi=100)
    except OSError as exc:
        raise UserError(f"--plot: cannot write {path} ({exc.strerror or exc}): choose a writable path") from None


def _flatten(spec: dict[str, Any]) -> dict[str, Any]:
    from orchestrator.options import leaves

    out: dict[str, Any] = {}
    for slot, entry in spec.items():
        if slot == "trainer":  # trainer.deepspeed.zero_optimization.overlap_comm: a row per DeepSpeed key
            out.update({".".join(("trainer", *path)): value for path, value in leaves(entry)})
        elif slot == "eval":
            out["eval"] = [e["name"] for e in entry]
        elif entry:
            out[f"{slot}.name"] = entry["name"]
            out.update({f"{slot}.{k}": v for k, v in entry["options"].items()})
    return out


# --- plugins ---------------------------------------------------------------------------------------

@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print a JSON list of components")
@click.pass_context
def plugins(ctx: click.Context, as_json: bool) -> None:
    """Every component, tracker and broken plugin found through the `orch` entry points."""
    if ctx.invoked_subcommand is not None:
        return
    from orchestrator.registry import Registry

    components = Registry.load().all()
    if as_json:
        click.echo(json.dumps([c.to_json() for c in components], indent=2))
        return
    for c in components:
        status = "" if c.status == "ok" else f"  BROKEN: {c.error}"
        click.echo(f"{c.kind:<10} {c.name:<18} {c.distribution} {c.version}  {c.summary}{status}")
        for o in c.options:
            default = "<required>" if o.required else o.default
            click.echo(f"{'':<29}{o.name}: {o.type_name} = {default}")


@plugins.command(name="new")
@click.argument("name")
@click.option("--kind", type=click.Choice(["loss", "encoder", "dataset", "sampler", "evaluator", "tracker"]),
              help="what the plugin adds (required)")
@click.option("--dir", "directory", default=".", type=click.Path(file_okay=False), show_default=True,
              help="where to create the package folder orch-NAME/")
def plugins_new(name: str, kind: str | None, directory: str) -> None:
    """Create a plugin package orch-NAME/ that adds one component of KIND (tests and README included)."""
    from pathlib import Path

    from orchestrator.scaffold import new_plugin

    target = new_plugin(name, kind, Path(directory))
    click.echo(f"created {target}: the {kind} {name!r} in package {target.name}\n"
               f"next: cd {target} && pip install -e . && python -m pytest; then `orch plugins` lists it")


# --- browsing runs -------------------------------------------------------------------------------------

@cli.command()
@click.option("--port", default=5000, type=click.IntRange(1, 65535), show_default=True, help="port to listen on")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; 0.0.0.0 exposes every run to your network")
@click.option("--allowed-hosts", default=None, metavar="LIST",
              help="Host headers MLflow accepts (default: loopback names and the bound address)")
def ui(port: int, host: str, allowed_hosts: str | None) -> None:
    """Browse runs in the MLflow UI (over MLFLOW_TRACKING_URI, else ./mlflow.db); Ctrl-C stops it."""
    from orchestrator.ui import serve

    sys.exit(serve(host, port, allowed_hosts, echo=click.echo))


def main() -> None:
    try:
        code = cli.main(prog_name="orch", standalone_mode=False)
    except UserError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.UsageError as exc:
        hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
