"""What a supervisor says of itself (``Supervisor.statistics()``): frozen structs, as trio's
``statistics()`` objects are, so that a snapshot never changes under its reader."""

from __future__ import annotations

import msgspec


class QueueStatistics(msgspec.Struct, frozen=True, kw_only=True):
    concurrency: int
    prefetch: int
    in_flight: int
    settled: int


class WorkerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    pid: int | None
    cpu: int | None
    ready: bool
    in_flight: int
    #: times it was started (1: never restarted)
    starts: int


class SupervisorStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a supervisor (``Supervisor.statistics()``)."""

    queues: dict[str, QueueStatistics]
    #: handler slots per worker process: the busiest process's share of all queues
    handler_slots_per_worker: int
    workers: tuple[WorkerStatistics, ...]
    #: the controller's recent changes: (unix time, queue, reason), newest last
    decisions: tuple[tuple[float, str, str], ...]
