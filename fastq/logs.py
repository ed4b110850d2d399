"""``fastq worker --log-format json``: one JSON object per log line, for log shippers.

Each object has ``time`` (UTC, ISO 8601), ``level``, ``pid``, ``logger`` and ``message``, then
``queue``, ``task`` and ``message_id`` where known: passed by the call (``extra={"queue": ...}``),
or, in a worker, the message whose handler is running (``current``: what the handler itself logs,
and the hooks around it, carry its message), and ``exception`` with the traceback when there was
one. Only ``fastq.cli`` (and a worker process, told by its spec) installs it.
"""

from __future__ import annotations

import datetime as dt
import logging
from contextvars import ContextVar

import msgspec

#: the ``extra=`` fields copied into the object when a record has them
FIELDS = ("queue", "task", "message_id")
#: what ``--log-format`` takes
FORMATS = ("text", "json")

_encoder = msgspec.json.Encoder()

#: (queue, task, message_id) of the message whose handler runs in this context: set by a worker
#: that logs JSON lines, in each message's own task (its threads get a copy)
current: ContextVar[tuple[str, str, str] | None] = ContextVar("fastq_message", default=None)


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        running = current.get()
        for i, name in enumerate(FIELDS):
            value = getattr(record, name, None)
            if value is None and running is not None:
                value = running[i] or None
            if value is not None:
                out[name] = str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return _encoder.encode(out).decode()


def install(level: str, log_format: str, text_format: str) -> None:
    """Log to stderr at ``level``, as JSON lines or as ``text_format``."""
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(text_format)
    )
    logging.basicConfig(level=level, handlers=[handler])


def root_format() -> str:
    """ "json" when this process logs JSON lines (``install``), else "text": what a supervisor
    tells its workers."""
    handlers = logging.getLogger().handlers
    return "json" if any(isinstance(h.formatter, JsonFormatter) for h in handlers) else "text"
