"""What a worker counts for the supervisor's /metrics, written on the middleware hooks.

``Tally`` is the middleware a worker puts first in its app's chain when its supervisor serves
metrics (``WorkerSpec.metrics``): per queue and handler it counts the runs by outcome, bins each
handler's duration (``time.perf_counter`` around the hooks and the handler) and each message's
enqueue-to-start latency (the envelope's ``enqueued_at`` against this host's clock) into the
buckets of ``fastq.wire``. Nothing leaves the process per message: the executor hands the counts
to the runtime as one report frame that goes in the same ``put_many`` as the completions they
count (``AppExecutor.reports``), and they start again from zero.
"""

from __future__ import annotations

from bisect import bisect_left
from time import perf_counter, time

from fastq import wire
from fastq.middleware import Middleware, Processing

__all__ = ["Tally"]

_HANDLER_BUCKETS = wire.HANDLER_BUCKETS
_LATENCY_BUCKETS = wire.LATENCY_BUCKETS


class Tally(Middleware):
    """Counts what the worker's handlers did, for the next report to the supervisor."""

    def __init__(self) -> None:
        #: (queue, handler) -> counts since the last report
        self.counts: dict[tuple[str, str], wire.Counts] = {}

    def _new(self, queue: str, task: str) -> wire.Counts:
        c = self.counts[(queue, task)] = wire.Counts(
            queue,
            task,
            0,
            0,
            0,
            0,
            [0] * (len(_HANDLER_BUCKETS) + 1),
            0.0,
            [0] * (len(_LATENCY_BUCKETS) + 1),
            0.0,
        )
        return c

    def before_process(self, message: Processing) -> None:
        message.clock = perf_counter()

    def after_process(self, message: Processing, exc: BaseException | None) -> None:
        took = perf_counter() - message.clock
        c = self.counts.get((message.queue, message.handler))
        if c is None:
            c = self._new(message.queue, message.handler)
        c.processed += 1
        c.handler_buckets[bisect_left(_HANDLER_BUCKETS, took)] += 1
        c.handler_sum += took
        if message.enqueued_at:  # started took seconds ago; never below 0 (clocks differ)
            waited = max(0.0, time() - took - message.enqueued_at)
            c.latency_buckets[bisect_left(_LATENCY_BUCKETS, waited)] += 1
            c.latency_sum += waited
        if exc is not None:
            c.failed += 1
            if message.outcome == "retried":
                c.retried += 1
            else:
                c.dead += 1

    def after_reject(self, message: Processing, reason: str) -> None:
        c = self.counts.get((message.queue, message.handler))
        if c is None:
            c = self._new(message.queue, message.handler)
        c.dead += 1

    def report(self) -> bytes:
        """The report frame of everything counted since the last one; the counts restart."""
        counts, self.counts = list(self.counts.values()), {}
        return wire.tally_report(counts)
