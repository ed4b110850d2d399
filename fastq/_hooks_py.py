"""Reference implementation of fastq._hooks: slow and obvious on purpose.
Any behavioural difference from this module is a bug in _hooks.pyx."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from time import time
from typing import Any

__all__ = ["MAX_BOUNDS", "Processing", "Tally"]

#: the most bucket bounds a histogram may have
MAX_BOUNDS = 32

#: one (queue, handler)'s counts: wire.Counts's fields, in its order
Counted = tuple[str, str, int, int, int, int, list[int], float, list[int], float]


class Processing:
    """What middleware sees of one message in a worker.

    ``handler`` is the task's or consumer's name, ``message_id`` the envelope's id (empty for a
    consumer's raw body), ``queue`` where it came from, ``retries`` how many times it failed
    before (``attempt`` = retries + 1), ``headers`` the envelope's headers (empty for a raw
    body), ``enqueued_at`` the unix time ``send`` made it (0.0: unknown). In ``after_process``,
    ``outcome`` is "ok", "retried" or "dead" and ``result`` what the handler returned (None
    when it raised). ``started_at``, ``clock`` and ``span`` are for hooks (TimingMiddleware's,
    the metrics' and the traces' own).
    """

    __slots__ = (
        "clock",
        "enqueued_at",
        "handler",
        "headers",
        "message_id",
        "outcome",
        "queue",
        "result",
        "retries",
        "span",
        "started_at",
    )

    def __init__(
        self,
        handler: str,
        message_id: str,
        queue: str,
        retries: int,
        headers: dict[str, str] | None = None,
        enqueued_at: float = 0.0,
    ) -> None:
        self.handler, self.message_id, self.queue, self.retries = (
            handler,
            message_id,
            queue,
            retries,
        )
        self.headers: dict[str, str] = headers if headers is not None else {}
        self.enqueued_at = enqueued_at
        self.started_at = self.clock = 0.0
        self.result: object = None
        self.outcome = ""
        self.span: Any = None

    @property
    def id(self) -> str:
        return self.message_id

    @property
    def task(self) -> str:
        return self.handler

    @property
    def attempt(self) -> int:
        """1 on the first delivery, 2 on the first retry..."""
        return self.retries + 1

    def __repr__(self) -> str:
        return (
            f"<Processing {self.handler} id={self.message_id!r} queue={self.queue!r} "
            f"attempt={self.attempt} outcome={self.outcome!r}>"
        )


class _Acc:
    """One (queue, handler)'s counts since the last take."""

    __slots__ = (
        "dead",
        "failed",
        "handler_buckets",
        "handler_sum",
        "latency_buckets",
        "latency_sum",
        "processed",
        "queue",
        "retried",
        "task",
    )

    def __init__(self, queue: str, task: str, handlers: int, latencies: int) -> None:
        self.queue, self.task = queue, task
        self.processed = self.failed = self.retried = self.dead = 0
        self.handler_buckets = [0] * (handlers + 1)
        self.latency_buckets = [0] * (latencies + 1)
        self.handler_sum = self.latency_sum = 0.0

    def counts(self) -> Counted:
        return (
            self.queue,
            self.task,
            self.processed,
            self.failed,
            self.retried,
            self.dead,
            list(self.handler_buckets),
            self.handler_sum,
            list(self.latency_buckets),
            self.latency_sum,
        )


class Tally:
    """Counts what a worker's handlers did, for the next report to the supervisor."""

    def __init__(self, handler_bounds: Sequence[float], latency_bounds: Sequence[float]) -> None:
        bounds = (tuple(handler_bounds), tuple(latency_bounds))
        for b in bounds:
            if len(b) > MAX_BOUNDS or list(b) != sorted(b):
                raise ValueError(
                    f"bucket bounds must be ascending and at most {MAX_BOUNDS}; got {b!r}"
                )
        self._handler_bounds, self._latency_bounds = bounds
        self._counts: dict[str, _Acc] = {}
        self._others: dict[tuple[str, str], _Acc] = {}

    def _of(self, queue: str, task: str) -> _Acc:
        c = self._counts.get(task)
        if c is None:
            c = self._counts[task] = self._new(queue, task)
        elif c.queue != queue:
            c = self._others.get((queue, task)) or self._others.setdefault(
                (queue, task), self._new(queue, task)
            )
        return c

    def _new(self, queue: str, task: str) -> _Acc:
        return _Acc(queue, task, len(self._handler_bounds), len(self._latency_bounds))

    def before_process(self, message: Processing) -> None:
        message.clock = time()

    def after_process(self, message: Processing, exc: BaseException | None) -> None:
        started = message.clock
        took = time() - started
        c = self._of(message.queue, message.handler)
        c.processed += 1
        c.handler_buckets[bisect_left(self._handler_bounds, took)] += 1
        c.handler_sum += took
        enqueued = message.enqueued_at
        if enqueued != 0.0:
            waited = started - enqueued
            c.latency_buckets[bisect_left(self._latency_bounds, waited)] += 1
            c.latency_sum += waited
        if exc is not None:
            c.failed += 1
            if message.outcome == "retried":
                c.retried += 1
            else:
                c.dead += 1

    def after_reject(self, message: Processing, reason: str) -> None:
        self._of(message.queue, message.handler).dead += 1

    @property
    def pending(self) -> bool:
        """Whether anything was counted since the last take."""
        return bool(self._counts)

    def take(self) -> list[Counted]:
        """Everything counted since the last take, one tuple of ``wire.Counts``'s fields per
        (queue, handler); the counts restart from zero."""
        out = [c.counts() for c in (*self._counts.values(), *self._others.values())]
        self._counts, self._others = {}, {}
        return out
