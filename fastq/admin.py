"""``fastq dlq``, ``fastq purge`` and ``fastq inspect``, their arguments and what they do (the
``fastq`` command, ``fastq.cli``, hands them over whole): dead letters listed, shown, requeued and
purged, ready messages purged, and the running supervisors of this host asked about themselves.

Every command prints to ``out`` and returns the exit code; bad input (a queue the app does not
consume, an id that names nothing, no supervisor running, an app that does not load) raises a
``FastqError`` (``ConfigError``, ``LoadError``) with one line that says what was expected, what
was seen and what to do: ``fastq.cli`` prints it and exits 2.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import msgspec

from fastq import _load
from fastq import message as _message
from fastq.app import App
from fastq.broker.base import DeadLetter
from fastq.engine import inspect as _inspect
from fastq.errors import ConfigError, MessageError

__all__ = [
    "COMMANDS",
    "add_commands",
    "dlq_list",
    "dlq_purge",
    "dlq_requeue",
    "dlq_show",
    "inspect",
    "purge",
    "run",
]

#: the commands of this module
COMMANDS = ("dlq", "purge", "inspect")


def add_commands(commands: Any) -> None:
    """Their parsers, on the ``fastq`` command's subparsers."""
    dlq = commands.add_parser("dlq", help="list, show, requeue or purge the dead letters")
    dlq.add_argument("app", help="module:app, e.g. shop.tasks:app")
    dlq.add_argument("--broker", help="broker URL (default: the app's)")
    actions = dlq.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="a queue's dead letters, oldest first")
    listing.add_argument("queue")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    listing.add_argument("--json", action="store_true", help="a JSON list of objects")
    show = actions.add_parser("show", help="one dead letter whole, its envelope decoded")
    show.add_argument("id", help="as the id column of `list` shows it")
    requeue = actions.add_parser("requeue", help="dead letters back to their queue")
    requeue.add_argument("queue")
    requeue.add_argument("ids", nargs="*", help="these (as `list` shows them)")
    requeue.add_argument("--all", action="store_true", help="every dead letter of the queue")
    purge_dlq = actions.add_parser("purge", help="delete a queue's dead letters")
    purge_dlq.add_argument("queue")
    purging = commands.add_parser("purge", help="delete a queue's ready messages (needs --yes)")
    purging.add_argument("app", help="module:app, e.g. shop.tasks:app")
    purging.add_argument("queue")
    purging.add_argument("--yes", action="store_true", help="yes, delete them for good")
    purging.add_argument("--broker", help="broker URL (default: the app's)")
    asking = commands.add_parser(
        "inspect", help="ask the running supervisors of an app on this host about themselves"
    )
    asking.add_argument("app", help="module:app, e.g. shop.tasks:app")
    asking.add_argument("--json", action="store_true", help="a JSON list, one per supervisor")
    asking.add_argument(
        "--timeout",
        type=float,
        default=_inspect.TIMEOUT,
        help=f"seconds to wait for each supervisor ({_inspect.TIMEOUT:g})",
    )


def run(args: argparse.Namespace) -> int:
    """Run the command ``args`` names (one of ``COMMANDS``); its exit code."""
    # a broker that cannot be reached is one line (fastq's); aiormq's own would say it again
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)
    if args.command == "inspect":
        if not args.timeout > 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {args.timeout:g}")
        _load.load(args.app)  # an app that does not load is named before anything is asked
        return inspect(args.app, timeout=args.timeout, as_json=args.json)
    app = _load.load(args.app)
    if not isinstance(app, App):
        raise ConfigError(f"{args.app} is a {type(app).__name__}, not a fastq.App")
    if args.broker:
        app.config = msgspec.structs.replace(app.config, broker_url=args.broker)
    if args.command == "purge":
        return purge(app, args.queue, yes=args.yes)
    if args.action == "list":
        return dlq_list(app, args.queue, args.limit, as_json=args.json)
    if args.action == "show":
        return dlq_show(app, args.id)
    if args.action == "requeue":
        return dlq_requeue(app, args.queue, args.ids, every=args.all)
    return dlq_purge(app, args.queue)


def check_queue(app: App, queue: str) -> None:
    """``queue`` is one the app consumes (any broker can tell that much)."""
    known = sorted(app.queues())
    if queue not in known:
        have = ", ".join(repr(q) for q in known) or "none"
        raise ConfigError(f"unknown queue {queue!r}: the app consumes {have}; name one of them")


def _key(app: App, d: DeadLetter) -> str:
    """The id ``fastq dlq show`` and ``requeue`` take: the row id, or RabbitMQ's message id."""
    return d.message_id if app.broker.dead_letter_key == "message_id" else str(d.id)


def _id(app: App, raw: str) -> int | str:
    if app.broker.dead_letter_key == "message_id":
        return raw
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(
            f"bad dead letter id {raw!r}: expected a positive integer, as the id column of "
            "fastq dlq list shows"
        )
    return value


def _task(body: bytes) -> str:
    try:
        return _message.decode(body).task
    except MessageError:
        return "-"


def _when(t: float) -> str:
    if not t:
        return "-"
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")


def _row(app: App, d: DeadLetter) -> dict[str, Any]:
    return {
        "id": _key(app, d),
        "queue": d.queue,
        "message_id": d.message_id,
        "task": _task(d.body),
        "attempts": d.attempts,
        "retries": d.retries,
        "reason": d.reason,
        "failed_at": d.failed_at,
    }


def dlq_list(app: App, queue: str, limit: int, *, as_json: bool, out: TextIO | None = None) -> int:
    """The dead letters of ``queue``, oldest first, at most ``limit``."""
    out = out or sys.stdout
    check_queue(app, queue)
    if limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    rows = [_row(app, d) for d in app.broker.dead_letters(queue, limit)]
    if as_json:
        out.write(msgspec.json.encode(rows).decode() + "\n")
        return 0
    out.write(
        f"{'id':<10} {'message id':<32} {'task':<24} {'attempts':>8} {'failed at':<25} reason\n"
    )
    for r in rows:
        reason = r["reason"].splitlines()[0] if r["reason"] else ""
        out.write(
            f"{r['id']:<10} {r['message_id']:<32} {r['task']:<24} {r['attempts']:>8} "
            f"{_when(r['failed_at']):<25} {reason}\n"
        )
    out.write(f"{len(rows)} dead letter(s) of {queue!r}\n")
    return 0


def _envelope(body: bytes) -> dict[str, Any] | str:
    """The body as its envelope says, arguments decoded; the reason when it is none."""
    try:
        e = _message.decode(body)
    except MessageError as error:
        return str(error)
    try:
        args: Any = msgspec.msgpack.decode(e.args)
    except msgspec.DecodeError as error:
        args = f"(not msgpack: {error})"
    return {
        "id": e.id,
        "task": e.task,
        "args": args,
        "enqueued_at": _when(e.enqueued_at),
        "attempt": e.attempt,
        "headers": e.headers,
    }


def dlq_show(app: App, raw_id: str, *, out: TextIO | None = None) -> int:
    """One dead letter whole: its row, headers, and its envelope where the body is one."""
    out = out or sys.stdout
    key = _id(app, raw_id)
    d = app.broker.dead_letter(key, queues=sorted(app.queues()))
    if d is None:
        raise ConfigError(
            f"no dead letter {raw_id!r} on {app.broker.url}; fastq dlq ... list QUEUE shows "
            "their ids"
        )
    shown = {
        **_row(app, d),
        "failed_at": _when(d.failed_at),
        "headers": d.headers,
        "body_bytes": len(d.body),
        "envelope": _envelope(d.body),
    }
    out.write(msgspec.json.format(msgspec.json.encode(shown), indent=2).decode() + "\n")
    return 0


def dlq_requeue(
    app: App, queue: str, ids: Sequence[str], *, every: bool, out: TextIO | None = None
) -> int:
    """Dead letters of ``queue`` back to it, with fresh counts: ``ids``, or all (``every``)."""
    out = out or sys.stdout
    check_queue(app, queue)
    if every == bool(ids):
        raise ConfigError(
            "requeue takes --all or dead letter ids (as fastq dlq list shows), not "
            + ("both" if every else "neither")
        )
    keys = None if every else [_id(app, i) for i in ids]
    moved = app.broker.requeue_dead_letters(keys, queue=queue)
    if keys is not None and moved < len(keys):
        out.write(f"requeued {moved} of {len(keys)} dead letter(s) to {queue!r}\n")
        raise ConfigError(
            f"{len(keys) - moved} of the ids given name no dead letter of {queue!r}; "
            "fastq dlq ... list QUEUE shows them"
        )
    out.write(f"requeued {moved} dead letter(s) to {queue!r}\n")
    return 0


def dlq_purge(app: App, queue: str, *, out: TextIO | None = None) -> int:
    """Delete the dead letters of ``queue``."""
    out = out or sys.stdout
    check_queue(app, queue)
    gone = app.broker.purge_dead_letters(queue)
    out.write(f"purged {gone} dead letter(s) of {queue!r}\n")
    return 0


def purge(app: App, queue: str, *, yes: bool, out: TextIO | None = None) -> int:
    """Delete the ready messages of ``queue``; refused without ``yes``."""
    out = out or sys.stdout
    check_queue(app, queue)
    if not yes:
        raise ConfigError(
            f"purge deletes every ready message of {queue!r} for good; add --yes to say you mean it"
        )
    gone = app.broker.purge(queue)
    out.write(f"purged {gone} ready message(s) of {queue!r}\n")
    return 0


def inspect(app_spec: str, *, timeout: float, as_json: bool, out: TextIO | None = None) -> int:
    """Ask every running supervisor of ``app_spec`` on this host about itself."""
    out = out or sys.stdout
    replies = _inspect.ask_all(app_spec, timeout=timeout)
    if not replies:
        raise ConfigError(
            f"no running supervisor of {app_spec} on this host (none answers in "
            f"{_inspect.runtime_dir()}); start one with fastq worker {app_spec}"
        )
    if as_json:
        out.write(msgspec.json.encode(replies).decode() + "\n")
        return 0
    out.writelines(_inspect.describe(r) for r in replies)
    return 0 if all(r.error == "" for r in replies) else 1
