"""Middleware: hooks around every message a worker processes and every message a task sends
(dramatiq's middleware/).

In the worker, middleware runs in the order the App was given it: ``before_process`` before the
handler, ``after_process`` after it (in reverse order) with the exception it raised or None; the
message's ``outcome`` ("ok", "retried", "dead") and the handler's return value (``result``) are
set by then. ``after_reject`` sees a message that never reached a handler (a body that is not an
envelope, an unknown task, arguments that do not validate), which is dead-lettered. A hook that
raises fails the message as its handler would. Any of these hooks may be ``async def``: it is
awaited on the worker's loop, inside the handler's own task (so a context variable it sets is
seen by the handler and by what the handler sends).

On the producing side, ``before_send`` sees each message a task makes (``send``, ``send_many``,
``call``, and the ``publish_to`` outputs a worker makes from a return value) before it is encoded,
and may add headers; it is a plain function (sends are synchronous).

Only the hooks a middleware overrides are called: a chain of middleware that override nothing
costs nothing per message.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from fastq.errors import ConfigError

# The record a hook sees is a C struct in fastq._hooks (its hooks read it without Python's
# attribute lookups); fastq._hooks_py has the slow, obvious twin.
if TYPE_CHECKING:
    from fastq._hooks import Processing
elif os.environ.get("FASTQ_NO_EXTENSIONS"):
    from fastq._hooks_py import Processing
else:
    from fastq._hooks import Processing  # an ImportError here means a broken build

logger = logging.getLogger(__name__)

__all__ = ["Hooks", "Middleware", "Processing", "Sending", "TimingMiddleware"]


class Sending:
    """What ``before_send`` sees of a message a task makes: its id, task, queue, the unix time
    it is made (``enqueued_at``), and its ``headers``, which the hook may add to (they travel in
    the envelope to the worker's ``Processing.headers``)."""

    __slots__ = ("enqueued_at", "headers", "message_id", "queue", "task")

    def __init__(
        self, task: str, message_id: str, queue: str, headers: dict[str, str], enqueued_at: float
    ) -> None:
        self.task, self.message_id, self.queue, self.headers = task, message_id, queue, headers
        self.enqueued_at = enqueued_at

    @property
    def id(self) -> str:
        return self.message_id

    def __repr__(self) -> str:
        return f"<Sending {self.task} id={self.message_id!r} queue={self.queue!r}>"


class Middleware:
    """Hooks around every message, called in the order they were given (after_process in
    reverse). Override the ones you need; any of the processing hooks may be ``async def``.
    """

    def before_process(self, message: Processing) -> Awaitable[None] | None:
        pass

    def after_process(
        self, message: Processing, exc: BaseException | None
    ) -> Awaitable[None] | None:
        pass

    def after_reject(self, message: Processing, reason: str) -> Awaitable[None] | None:
        """A message that never reached its handler; it is dead-lettered with ``reason``."""

    def before_send(self, message: Sending) -> None:
        """A message a task makes, before it is encoded: add to ``message.headers`` here."""


#: a hook to call, and whether what it returns must be awaited
Hook = tuple[Callable[..., Any], bool]


def _overridden(middleware: Iterable[object], name: str) -> list[Hook]:
    hooks = []
    for mw in middleware:
        fn = getattr(mw, name, None)
        if fn is None or getattr(type(mw), name, None) is getattr(Middleware, name):
            continue  # the base class's no-op: not called at all
        hooks.append((fn, inspect.iscoroutinefunction(fn)))
    return hooks


def _all_sync(hooks: list[Hook]) -> tuple[Callable[..., Any], ...] | None:
    return None if any(is_async for _, is_async in hooks) else tuple(fn for fn, _ in hooks)


class Hooks:
    """The hooks of a middleware chain that do something, in the order they run, each with
    whether it is awaited (found once: a worker calls them for every message).

    Raises:
        ConfigError: a ``before_send`` is ``async def``.
    """

    def __init__(self, middleware: Sequence[object]) -> None:
        self.before = _overridden(middleware, "before_process")
        self.after = _overridden(reversed(middleware), "after_process")
        #: the before hooks as plain callables when none of them is async (None otherwise): a
        #: loop without the awaitable test, for every message
        self.before_sync = _all_sync(self.before)
        self.reject = _overridden(reversed(middleware), "after_reject")
        send = _overridden(middleware, "before_send")
        for fn, is_async in send:
            if is_async:
                raise ConfigError(
                    f"{fn.__qualname__} is async def; before_send runs inside send(), which is "
                    "synchronous: make it a plain function"
                )
        self.send = [fn for fn, _ in send]


class TimingMiddleware(Middleware):
    """Logs each message's handler, outcome and duration (DEBUG, or WARNING on failure)."""

    def before_process(self, message: Processing) -> None:
        message.started_at = time.perf_counter()

    def after_process(self, message: Processing, exc: BaseException | None) -> None:
        took = time.perf_counter() - (message.started_at or time.perf_counter())
        if exc is None:
            logger.debug("%s %s done in %.6f s", message.handler, message.message_id, took)
        else:
            logger.warning(
                "%s %s failed after %.6f s: %s: %s",
                message.handler,
                message.message_id,
                took,
                type(exc).__name__,
                exc,
            )
