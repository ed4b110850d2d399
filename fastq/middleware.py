"""Middleware: hooks around every message a worker processes (dramatiq's middleware/).

Middleware runs in the worker processes, in the order the App was given it: ``before_process``
before the handler, ``after_process`` after it (in reverse order) with the exception it raised or
None, and the handler's return value in ``message.result``. A hook that raises fails the message
as its handler would. What a hook sees of the message is a ``Processing``.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

__all__ = ["Middleware", "Processing", "TimingMiddleware"]


class Processing:
    """What middleware sees of one message: the handler's name, the message id (empty for a
    consumer's raw body), the queue and how many times it was retried before; in
    ``after_process``, ``result`` is what the handler returned (None when it raised). Hooks may
    set attributes of their own on it (``started_at`` is TimingMiddleware's)."""

    __slots__ = ("handler", "message_id", "queue", "result", "retries", "started_at")

    def __init__(self, handler: str, message_id: str, queue: str, retries: int) -> None:
        self.handler, self.message_id, self.queue, self.retries = (
            handler,
            message_id,
            queue,
            retries,
        )
        self.started_at = 0.0
        self.result: object = None


class Middleware:
    """Hooks around every message a worker processes, called in the order they were given.

    ``before_process`` runs before the handler; ``after_process`` after it, with the exception it
    raised or None (and its return value in ``message.result``). A hook that raises fails the
    message like its handler would.
    """

    def before_process(self, message: Processing) -> None:
        pass

    def after_process(self, message: Processing, exc: BaseException | None) -> None:
        pass


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
