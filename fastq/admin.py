"""What ``fastq dlq``, ``fastq purge`` and ``fastq inspect`` do, apart from parsing their
arguments (``fastq.cli``): dead letters listed, shown, requeued and purged, ready messages purged,
and the running supervisors of this host asked about themselves.

Every function prints to ``out`` and returns the exit code; bad input (a queue the app does not
consume, an id that names nothing, no supervisor running) raises ``ConfigError`` with one line
that says what was expected, what was seen and what to do.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import msgspec

from fastq import message as _message
from fastq.app import App
from fastq.broker.base import DeadLetter
from fastq.engine import inspect as _inspect
from fastq.errors import ConfigError, MessageError

__all__ = [
    "dlq_list",
    "dlq_purge",
    "dlq_requeue",
    "dlq_show",
    "inspect",
    "purge",
]


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
