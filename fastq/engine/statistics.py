"""What a supervisor says of itself (``Supervisor.statistics()``): frozen structs, as trio's
``statistics()`` objects are, so that a snapshot never changes under its reader."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from fastq.engine.fleet import Fleet
    from fastq.engine.placement import Placement
    from fastq.engine.pump import Pumps


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


def snapshot(
    queues: Iterable[str],
    pumps: Pumps,
    placement: Placement,
    fleet: Fleet,
    starts: Mapping[int, int],
    decisions: Iterable[tuple[float, str, str]],
) -> SupervisorStatistics:
    """A supervisor's statistics, from its rooms."""
    queue_stats = {
        q: QueueStatistics(
            concurrency=placement.concurrency[q],
            prefetch=pumps.prefetch[q],
            in_flight=pumps.in_flight[q],
            settled=pumps.settled_by_queue[q],
        )
        for q in queues
    }
    workers = tuple(
        WorkerStatistics(
            index=m.index,
            pid=m.process.pid if m.process else None,
            cpu=m.cpu,
            ready=m.ready,
            in_flight=fleet.dispatcher.in_flight(m.index),
            starts=starts.get(m.index, 0),
        )
        for m in fleet
    )
    return SupervisorStatistics(
        queues=queue_stats,
        handler_slots_per_worker=placement.slots,
        workers=workers,
        decisions=tuple(decisions),
    )
