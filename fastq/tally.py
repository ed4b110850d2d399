"""What a worker counts for the supervisor's /metrics, written on the middleware hooks.

``Tally`` is the middleware a worker puts first in its app's chain when its supervisor serves
metrics (``WorkerSpec.metrics``): per queue and handler it counts the runs by outcome, bins each
handler's duration (the wall clock around the other hooks and the handler) and each message's
enqueue-to-start latency (the envelope's ``enqueued_at`` against this host's clock) into the
buckets of ``fastq.wire``. Nothing leaves the process per message: the executor hands the counts
to the runtime as one report frame that goes in the same ``put_many`` as the completions they
count (``AppExecutor.reports``), and they start again from zero.
"""

from __future__ import annotations

from bisect import bisect_left
from time import time

from fastq import wire
from fastq.middleware import Middleware, Processing

__all__ = ["Tally"]

_HANDLER_BUCKETS = wire.HANDLER_BUCKETS
_LATENCY_BUCKETS = wire.LATENCY_BUCKETS


class _Acc:
    """One handler's counts (a plain object: its attributes cost less to bump than a Struct's)."""

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

    def __init__(self, queue: str, task: str) -> None:
        self.queue, self.task = queue, task
        self.processed = self.failed = self.retried = self.dead = 0
        self.handler_buckets = [0] * (len(_HANDLER_BUCKETS) + 1)
        self.latency_buckets = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.handler_sum = self.latency_sum = 0.0

    def counts(self) -> wire.Counts:
        return wire.Counts(
            self.queue,
            self.task,
            self.processed,
            self.failed,
            self.retried,
            self.dead,
            self.handler_buckets,
            self.handler_sum,
            self.latency_buckets,
            self.latency_sum,
        )


class Tally(Middleware):
    """Counts what the worker's handlers did, for the next report to the supervisor."""

    def __init__(self) -> None:
        #: handler -> counts since the last report (of the handler's queue: nearly always one)
        self.counts: dict[str, _Acc] = {}
        #: (queue, handler) -> counts, for a handler name met on a second queue
        self.others: dict[tuple[str, str], _Acc] = {}

    def _of(self, queue: str, task: str) -> _Acc:
        c = self.counts.get(task)
        if c is None:
            c = self.counts[task] = _Acc(queue, task)
        elif c.queue != queue:
            c = self.others.get((queue, task)) or self.others.setdefault(
                (queue, task), _Acc(queue, task)
            )
        return c

    def before_process(self, message: Processing) -> None:
        message.clock = time()

    def after_process(self, message: Processing, exc: BaseException | None) -> None:
        # One wall clock for both: the start against the enqueue time, the end against the start
        # (two clock reads a message, not three). A negative span (a clock stepped back, another
        # host's clock ahead of ours) falls in the first bucket.
        started = message.clock
        took = time() - started
        c = self.counts.get(message.handler)
        if c is None or c.queue != message.queue:
            c = self._of(message.queue, message.handler)
        c.processed += 1
        c.handler_buckets[bisect_left(_HANDLER_BUCKETS, took)] += 1
        c.handler_sum += took
        enqueued = message.enqueued_at
        if enqueued:
            waited = started - enqueued
            c.latency_buckets[bisect_left(_LATENCY_BUCKETS, waited)] += 1
            c.latency_sum += waited
        if exc is not None:
            c.failed += 1
            if message.outcome == "retried":
                c.retried += 1
            else:
                c.dead += 1

    def after_reject(self, message: Processing, reason: str) -> None:
        self._of(message.queue, message.handler).dead += 1

    def report(self) -> bytes:
        """The report frame of everything counted since the last one; the counts restart."""
        counts = [c.counts() for c in (*self.counts.values(), *self.others.values())]
        self.counts, self.others = {}, {}
        return wire.tally_report(counts)
