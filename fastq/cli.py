"""The ``fastq`` command (also ``python -m fastq``): ``worker``, ``plan``, ``send``, ``stats``,
``dlq``, ``purge``, ``inspect`` and ``bench`` (what ``dlq``, ``purge`` and ``inspect`` do is
``fastq.admin``'s).

Bad arguments exit with RET_USAGE and one line that says what to change, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import TYPE_CHECKING, Any

from fastq import _load
from fastq.errors import FastqError, LoadError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from fastq.broker import QueueDepth

RET_OK = 0
RET_ERROR = 1
RET_USAGE = 2


class UsageError(Exception):
    """A bad argument: printed as one line, exit RET_USAGE."""


def load(spec: str) -> Any:
    try:
        return _load.load(spec)
    except LoadError as e:
        raise UsageError(str(e)) from None


def _send(spec: str, arguments: str) -> int:
    import msgspec

    from fastq.task import Task

    task = load(spec)
    if not isinstance(task, Task):
        raise UsageError(f"{spec} is a {type(task).__name__}, not a task made with @app.task")
    try:
        values = msgspec.json.decode(arguments)
    except msgspec.DecodeError as e:
        raise UsageError(
            f"arguments {arguments!r} are not JSON ({e}); pass a list or an object"
        ) from None
    try:
        if isinstance(values, list):
            message_id = task.send(*values)
        elif isinstance(values, dict):
            message_id = task.send(**values)
        else:
            raise UsageError(
                f"arguments must be a JSON list (positional) or object (by name), got {arguments!r}"
            )
    except (TypeError, msgspec.ValidationError) as e:
        raise UsageError(f"arguments do not fit {task.name}{task.signature}: {e}") from None
    print(message_id)
    return RET_OK


def _app_with_overrides(args: argparse.Namespace) -> Any:
    """The App that ``args.app`` names, its config changed by the command-line settings."""
    import msgspec

    from fastq.app import App
    from fastq.errors import ConfigError

    app = load(args.app)
    if not isinstance(app, App):
        raise UsageError(f"{args.app} is a {type(app).__name__}, not a fastq.App")
    overrides = {
        k: v
        for k, v in (
            ("processes", args.processes),
            ("concurrency", args.concurrency),
            ("prefetch", args.prefetch),
            ("broker_url", args.broker),
            ("autosize", getattr(args, "autosize", None)),
            ("metrics", getattr(args, "metrics", None)),
        )
        if v is not None
    }
    try:
        # validated: the setting is named
        app.config = msgspec.structs.replace(app.config, **overrides)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    return app


def _worker(args: argparse.Namespace) -> int:
    import logging

    from fastq import logs
    from fastq.errors import ConfigError

    logs.install(
        args.log_level.upper(),
        args.log_format,
        "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    if args.log_level != "debug":  # fastq says what failed and what to check; aiormq's own
        logging.getLogger("aiormq").setLevel(logging.CRITICAL)  # lines would say it twice
    app = _app_with_overrides(args)
    try:
        from fastq.engine.supervisor import run_app

        return run_app(app, args.app, args.queue, log_level=args.log_level.upper())
    except ConfigError as e:
        raise UsageError(str(e)) from None


def _stats(args: argparse.Namespace) -> int:
    """The work-queue tutorial's "monitor the number of tasks in the queue", for every queue."""
    import asyncio

    import msgspec

    from fastq.app import App

    app = load(args.app)
    if not isinstance(app, App):
        raise UsageError(f"{args.app} is a {type(app).__name__}, not a fastq.App")
    if args.broker:
        app.config = msgspec.structs.replace(app.config, broker_url=args.broker)
    queues = args.queue or sorted(app.queues())

    async def measure() -> dict[str, QueueDepth]:
        try:
            return {q: await app.queue_depth(q) for q in queues}
        finally:
            await app.broker.close()

    depths = asyncio.run(measure())
    if args.json:
        print(msgspec.json.encode(depths).decode())
        return RET_OK
    print(f"{'queue':<30} {'ready':>9} {'unacked':>9} {'delayed':>9} {'dead':>9} {'consumers':>9}")
    for q, d in depths.items():
        consumers = "-" if d.consumers is None else d.consumers
        scope = "" if d.unacked_scope == "all" else f"  (unacked: {d.unacked_scope})"
        print(
            f"{q:<30} {d.ready:>9} {d.unacked:>9} {d.delayed:>9} {d.dead:>9} {consumers:>9}{scope}"
        )
    return RET_OK


def _plan(args: argparse.Namespace) -> int:
    import msgspec

    from fastq.autosize import plan_app
    from fastq.errors import ConfigError

    app = _app_with_overrides(args)
    try:
        the_plan = plan_app(app, args.queue)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(the_plan).decode(), indent=2))
    else:
        print(f"fastq plan for {args.app} on this machine (nothing started):")
        print(the_plan.explain())
        for line in _schedules(app):
            print(line)
    return RET_OK


def _schedules(app: Any) -> list[str]:
    """Each periodic task and its next three fire times, in its own time zone."""
    import datetime as dt
    import time
    from zoneinfo import ZoneInfo

    if not app.schedules:
        return []
    lines = ["periodic (each tick enqueued once across every supervisor):"]
    now = time.time()
    for s in app.schedules.values():
        zone = ZoneInfo(s.timezone)
        fires = ", ".join(
            dt.datetime.fromtimestamp(t, zone).isoformat(timespec="seconds") for t in s.fires(now)
        )
        lines.append(f"  {s.name}: {s.describe()}, catch_up={s.catch_up}; next {fires}")
    return lines


def _keys(flag: str, value: str | None, known: Iterable[str]) -> tuple[str, ...]:
    """The comma-separated keys of a bench flag, each checked against ``known``."""
    if not value:
        return ()
    keys = tuple(k.strip() for k in value.split(",") if k.strip())
    if unknown := [k for k in keys if k not in known]:
        raise UsageError(f"{flag} takes {', '.join(known)}; got {', '.join(unknown)}")
    return keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastq", description="fastq: queued messages and tasks on every core"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="measure fastq against the baselines on this machine")
    bench.add_argument(
        "suite",
        nargs="?",
        default="engine",
        choices=["engine", "ring", "autosize", "pool", "soak", "pipeline", "workflow"],
        help="engine: noop/io/cpu handlers on memory:// and sqlite:// (default); ring: the rings "
        "alone; soak: mixed load with a worker SIGKILLed every minute (--minutes, default 20); "
        "pipeline: 3-stage publish_to chains and call latency (with --broker amqp://: beside "
        "Celery and Dramatiq, and a hand-written aiormq RPC as the floor); workflow: a fan-out "
        "of 1,000 and 1,000 4-step chains beside "
        "Celery's chord/chain and Dramatiq's group/pipeline (with --broker amqp://: fastq on "
        "RabbitMQ too)",
    )
    bench.add_argument(
        "--minutes", type=float, default=20.0, help="length of the soak suite (default 20)"
    )
    bench.add_argument(
        "--runs", type=int, default=3, help="runs per scenario; the median is reported (default 3)"
    )
    bench.add_argument(
        "--sizes", default="100,1024,65536", help="frame sizes in bytes (default 100,1024,65536)"
    )
    bench.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="length of one run: ring, default 0.4; autosize, the autosized runs, default 20",
    )
    bench.add_argument(
        "--json", metavar="PATH", help="also write the figures as JSON to PATH ('-' for stdout)"
    )
    bench.add_argument(
        "--broker",
        metavar="URL",
        help="engine suite through this broker instead: amqp://user:pass@host:port/vhost "
        "(RabbitMQ), or postgresql://user:pass@host:port/db (beside procrastinate and SQLite)",
    )
    bench.add_argument(
        "--peers",
        action="store_true",
        help="with --broker amqp://: the noop, I/O and CPU scenarios through fastq's defaults "
        "beside Dramatiq, taskiq, FastStream, Celery and hand-written aio-pika and aiormq "
        "consumers, in the same run",
    )
    bench.add_argument(
        "--systems",
        metavar="KEYS",
        help="with --peers: only these systems, comma-separated (fastq, fastq-held, dramatiq, "
        "taskiq, faststream, celery, aio-pika, aiormq; default all)",
    )
    bench.add_argument(
        "--scenarios",
        metavar="KEYS",
        help="with --peers: only these scenarios, comma-separated (noop40k, io5k, io40k, cpu5k; "
        "default all)",
    )
    send = commands.add_parser(
        "send", help="enqueue one task call from a shell; prints its message id"
    )
    send.add_argument("task", help="module:task, e.g. shop.tasks:send_receipt")
    send.add_argument(
        "arguments", nargs="?", default="[]", help="JSON list (positional) or object (by name)"
    )
    stats = commands.add_parser(
        "stats", help="messages ready, unacked, delayed and dead per queue of an app"
    )
    stats.add_argument("app", help="module:app, e.g. shop.tasks:app")
    stats.add_argument("--queue", action="append", help="only this queue (repeatable)")
    stats.add_argument("--broker", help="broker URL (default: the app's)")
    stats.add_argument("--json", action="store_true", help="one JSON object: queue -> counts")
    from fastq import admin, runs

    admin.add_commands(commands)
    runs.add_command(commands)
    work = commands.add_parser("worker", help="run the workers of an app: fastq worker module:app")
    show = commands.add_parser(
        "plan", help="print the sizing plan for this machine, and why, without starting anything"
    )
    for sub in (work, show):
        sub.add_argument("app", help="module:app, e.g. shop.tasks:app")
        sub.add_argument("--queue", action="append", help="consume only this queue (repeatable)")
        sub.add_argument(
            "--processes", type=int, help="worker processes (default: one per usable core)"
        )
        sub.add_argument("--concurrency", type=int, help="handlers at once per queue, whole host")
        sub.add_argument("--prefetch", type=int, help="unacked messages per queue, whole host")
        sub.add_argument("--broker", help="broker URL (default: the app's)")
    work.add_argument(
        "--autosize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="follow the load, moving what you did not set (default: on, or FASTQ_AUTOSIZE)",
    )
    work.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    work.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="json: one object per line (time, level, pid, logger, message, queue, task, ...)",
    )
    work.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus /metrics there (a port alone: on 127.0.0.1; needs the metrics "
        "extra; default: FASTQ_METRICS, else off)",
    )
    show.add_argument(
        "--json", action="store_true", help="the plan as JSON, every number with its rule"
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "worker":
            return _worker(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "stats":
            return _stats(args)
        if args.command == "send":
            return _send(args.task, args.arguments)
        if args.command in admin.COMMANDS:
            return admin.run(args)
        if args.command == "runs":
            return runs.run(args)
        if args.runs < 1:
            raise UsageError(f"--runs must be >= 1, got {args.runs}")
        if (args.systems or args.scenarios) and not args.peers:
            raise UsageError("--systems and --scenarios go with --broker amqp://... --peers")
        if args.suite == "workflow":
            from fastq._bench import workflow

            if args.broker and not args.broker.lower().startswith(("amqp://", "amqps://")):
                raise UsageError(
                    f"workflow takes --broker amqp://... (memory:// and sqlite:// always run), "
                    f"got {args.broker.split('://')[0]}://..."
                )
            return workflow.main(runs=args.runs, json_path=args.json, broker=args.broker)
        if args.suite == "pipeline":
            from fastq._bench import pipeline

            if args.broker and not args.broker.lower().startswith(("amqp://", "amqps://")):
                raise UsageError(
                    "--broker takes an amqp:// URL (memory:// and sqlite:// are measured by "
                    f"default); got {args.broker.partition('://')[0]}://..."
                )
            return pipeline.main(runs=args.runs, url=args.broker, json_path=args.json)
        if args.suite == "engine" and args.broker:
            if args.broker.lower().startswith(("postgresql://", "postgres://")) and not args.peers:
                from fastq._bench import postgres

                return postgres.main(url=args.broker, runs=args.runs, json_path=args.json)
            if not args.broker.lower().startswith(("amqp://", "amqps://")):
                raise UsageError(
                    f"--broker takes an amqp:// or postgresql:// URL (the embedded brokers are "
                    "measured by default); "
                    f"got {args.broker.partition('://')[0]}://..."
                )
            if args.peers:
                from fastq._bench import workers

                return workers.main(
                    url=args.broker,
                    runs=args.runs,
                    json_path=args.json,
                    only_systems=_keys("--systems", args.systems, workers.SYSTEM_KEYS),
                    only_scenarios=_keys("--scenarios", args.scenarios, workers.SCENARIO_KEYS),
                )
            from fastq._bench import amqp

            return amqp.main(url=args.broker, runs=args.runs, json_path=args.json)
        if args.suite == "engine":
            from fastq._bench import engine

            return engine.main(runs=args.runs, json_path=args.json)
        if args.suite == "pool":
            from fastq._bench import pool

            return pool.main(runs=args.runs, json_path=args.json)
        if args.suite == "soak":
            from fastq._bench import soak

            if not args.minutes > 0:
                raise UsageError(f"--minutes must be > 0, got {args.minutes:g}")
            return soak.main(minutes=args.minutes, json_path=args.json)
        if args.suite == "autosize":
            from fastq._bench import autosize

            if args.seconds is not None and args.seconds < 5:
                raise UsageError(
                    f"--seconds must be >= 5 for the autosize suite, got {args.seconds:g}"
                )
            return autosize.main(seconds=args.seconds or 20.0, json_path=args.json)
        from fastq._bench import ring

        try:
            sizes = [int(s) for s in args.sizes.split(",")]
        except ValueError:
            raise UsageError(
                f"--sizes takes comma-separated integers, got {args.sizes!r}"
            ) from None
        return ring.main(
            sizes=sizes, runs=args.runs, seconds=args.seconds or 0.4, json_path=args.json
        )
    except UsageError as e:
        print(f"fastq {args.command}: {e}", file=sys.stderr)
        return RET_USAGE
    except FastqError as e:
        # A broker that cannot be opened (what was tried, masked, and what to check), a disk
        # that refused a write, a setting that does not hold: one line; the traceback only when
        # asked for with --log-level debug.
        if getattr(args, "log_level", "") == "debug":
            traceback.print_exc()
        print(f"fastq {args.command}: {e}", file=sys.stderr)
        return RET_USAGE


if __name__ == "__main__":
    sys.exit(main())
