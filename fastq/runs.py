"""``fastq runs``: a workflow app's runs listed, one shown as its graph with each step's state,
one resumed (the ``fastq`` command, ``fastq.cli``, hands the arguments over whole).

    fastq runs shop.flows:app [--workflow catalog] [--state failed]
    fastq runs shop.flows:app show RUN
    fastq runs shop.flows:app resume RUN
    fastq runs shop.flows:app forget RUN

Every command prints to ``out`` and returns the exit code; bad input (an app that does not
load, a workflow it does not define, a run that does not exist) raises a ``FastqError`` with one
line, which ``fastq.cli`` prints before it exits 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from typing import Any, TextIO

import msgspec

from fastq import _load
from fastq.app import App
from fastq.errors import ConfigError
from fastq.workflow import api

__all__ = ["add_command", "forget", "resume", "run", "runs_list", "show"]


def add_command(commands: Any) -> None:
    """Its parser, on the ``fastq`` command's subparsers."""
    p = commands.add_parser("runs", help="list, show or resume an app's workflow runs")
    p.add_argument("app", help="module:app, e.g. shop.flows:app")
    p.add_argument(
        "action", nargs="?", default="list", choices=["list", "show", "resume", "forget"]
    )
    p.add_argument("run", nargs="?", help="the run id (show, resume, forget)")
    p.add_argument("--workflow", help="only this workflow's runs (list)")
    p.add_argument("--state", choices=["running", "done", "failed"], help="only runs in it")
    p.add_argument("--limit", type=int, default=50, help="at most this many, newest first (50)")
    p.add_argument("--broker", help="broker URL (default: the app's)")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the command ``args`` names; its exit code."""
    out = out or sys.stdout
    app = _load.load(args.app)
    if not isinstance(app, App):
        raise ConfigError(f"{args.app} is a {type(app).__name__}, not a fastq.App")
    if args.broker:
        app.config = msgspec.structs.replace(app.config, broker_url=args.broker)
    if args.action == "list":
        if args.run:
            raise ConfigError(f"list takes no run id, got {args.run!r}; use `show {args.run}`")
        return runs_list(app, args.workflow, args.state, args.limit, out)
    if not args.run:
        raise ConfigError(f"{args.action} needs a run id: fastq runs {args.app} {args.action} RUN")
    if args.action == "show":
        return show(app, args.run, out)
    if args.action == "forget":
        return forget(app, args.run, out)
    return resume(app, args.run, out)


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def runs_list(app: App, workflow: str | None, state: str | None, limit: int, out: TextIO) -> int:
    """One line per run, newest first: id, workflow, state, started and ended (UTC)."""
    if workflow is not None and workflow not in app.workflows:
        have = ", ".join(sorted(app.workflows)) or "none"
        raise ConfigError(f"{app.name} defines no workflow {workflow!r}; it defines: {have}")
    rows = api.list_runs(app, workflow, state, limit)
    print(f"{'run':<34} {'workflow':<16} {'state':<8} {'started (UTC)':<19}  ended", file=out)
    for r in rows:
        print(
            f"{r.run_id:<34} {r.workflow:<16} {r.state:<8} {_when(r.created_at):<19}  "
            f"{_when(r.finished_at)}",
            file=out,
        )
    return 0


def show(app: App, run_id: str, out: TextIO) -> int:
    """The run's graph, a step a line in definition order with its parents, state, attempts,
    duration and error; a fanned-out step with its elements counted by state."""
    st, graph = api.read_status(app, run_id), api.read_graph(app, run_id)
    if st is None or graph is None:
        raise ConfigError(
            f"no run {run_id!r} in {api.store_of(app).url}; list the runs with "
            "`fastq runs module:app`"
        )
    print(f"run {st.run_id} of {st.workflow}: {st.state}", file=out)
    print(f"  started {_when(st.created_at)} UTC, ended {_when(st.finished_at)} UTC", file=out)
    for spec in graph.steps:
        s = st.steps[spec.name]
        took = f"{s.finished_at - s.started_at:.3f} s" if s.started_at and s.finished_at else "-"
        after = f" <- {', '.join(spec.parents)}" if spec.parents else ""
        extra = f" [{spec.trigger}]" if spec.trigger != "all_success" else ""
        line = f"  {spec.name:<20} {s.state:<8} attempts {s.attempts}  {took}{after}{extra}"
        if spec.fan_out:
            counts: dict[str, int] = {}
            for e in s.elements:
                counts[e.state] = counts.get(e.state, 0) + 1
            line += " fan-out: " + (
                ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no elements yet"
            )
        print(line, file=out)
        if s.error:
            print(f"      {s.error}", file=out)
    if st.context:
        print(f"  context: {st.context}", file=out)
    return 0


def resume(app: App, run_id: str, out: TextIO) -> int:
    """Resume the run (``Workflow.resume``): prints the steps that run again."""
    again = api.resume_run(app, run_id)
    if again:
        print(f"resumed run {run_id}: {', '.join(again)} will run again", file=out)
    else:
        print(f"run {run_id} has nothing to resume (it is running, or done)", file=out)
    return 0


def forget(app: App, run_id: str, out: TextIO) -> int:
    """Delete an ended run (``Workflow.forget``); exit 1 when it is running or unknown."""
    if api.forget_run(app, run_id):
        print(f"forgot run {run_id}", file=out)
        return 0
    print(f"run {run_id} is running, or there is no such run: nothing forgotten", file=out)
    return 1
