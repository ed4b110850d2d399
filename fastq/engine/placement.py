"""Which worker processes run each queue, and the handler slots each of them gets.

A queue runs on the workers its plan gave it (``processes=``), and its host concurrency is split
over them (``autosize.split``). A CPU queue whose share of the cores is smaller than its workers
runs on one worker per handler (CPU handlers run inline: one per worker at a time), chosen among
the workers that take work now and apart from the other CPU queues where there are enough. Each
worker is told its slots, in all and per queue, with a control frame whenever they change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from fastq import wire
from fastq.autosize import Plan, split
from fastq.engine.fleet import Member
from fastq.errors import RingClosed, RingFull
from fastq.ring import Dispatcher

logger = logging.getLogger(__name__)


class Placement:
    """The queues' workers and the workers' slots (see the module docstring).

    Parameters:
        plan: the host's plan (processes, and each queue's workers and concurrency).
        queues: the queues this supervisor consumes, in queue-index order.
        dispatcher: told which workers may take each queue.
    """

    def __init__(self, plan: Plan, queues: list[str], dispatcher: Dispatcher) -> None:
        self.plan, self.queues, self.dispatcher = plan, queues, dispatcher
        self.queue_index = {q: i for i, q in enumerate(queues)}
        #: each queue's concurrency on the host now (the plan's, then the controller's)
        self.concurrency = {q.name: q.concurrency for q in plan.queues}
        #: the workers each queue runs on now: the plan's, or for a CPU queue whose share of the
        #: cores is smaller, one per handler (place_queues)
        self.workers = {q.name: q.workers for q in plan.queues}
        #: per queue index, the workers that may run it
        self.allowed = [set(range(plan.processes)) for _ in queues]
        for q in plan.queues:
            if q.name in self.queue_index and len(q.workers) < plan.processes:
                self.allowed[self.queue_index[q.name]] = set(q.workers)
                dispatcher.allow(self.queue_index[q.name], q.workers)
        #: handler slots per worker process: the busiest process's share of all queues
        self.slots = self.slots_needed()
        #: what each worker was told last: (slots, per-queue slots)
        self.told: dict[int, tuple[int, tuple[int, ...]]] = {}

    def may_run(self, queue: str, worker: int) -> bool:
        return worker in self.allowed[self.queue_index[queue]]

    def slots_needed(self) -> int:
        """Handler slots per worker process: the busiest process's share of all queues."""
        return max(1, max(sum(self.slots_of(i)) for i in range(self.plan.processes)))

    def slots_of(self, index: int) -> tuple[int, ...]:
        """Worker ``index``'s share of each queue's concurrency (in queue index order)."""
        return tuple(
            split(self.concurrency[q], self.workers[q], self.plan.processes)[index]
            for q in self.queues
        )

    def spec_slots(self, index: int) -> tuple[int, tuple[int, ...]]:
        """The slots a worker starts with, remembered as told."""
        told = self.told[index] = (self.slots, self.slots_of(index))
        return told

    def place_queues(self, kind: Callable[[str], str], usable: Callable[[int], bool]) -> bool:
        """Run each queue whose concurrency is smaller than its workers on one worker per
        handler, so that no worker gets its messages with no slot for them: workers that take
        work now (``usable``) before the others, apart from the other queues of its kind
        (``kind(name)``) where there are enough; the plan's workers when it has them all. A CPU
        queue's share of the cores moves it (CPU handlers run inline, one per worker); an I/O
        queue's concurrency does when it falls below its workers. Returns whether a queue moved
        (messages already on a worker finish there)."""
        changed = False
        for which in ("cpu", "io"):
            start, taken = 0, set[int]()
            for q in self.plan.queues:
                if kind(q.name) != which or q.name not in self.queue_index:
                    continue
                k, mine = self.concurrency[q.name], q.workers
                if k >= len(mine):
                    workers = mine
                else:
                    turn = [mine[(start + i) % len(mine)] for i in range(len(mine))]
                    rank = {i: (not usable(i), i in taken, n) for n, i in enumerate(turn)}
                    workers = tuple(sorted(sorted(turn, key=rank.__getitem__)[:k]))
                start += k
                taken.update(workers)
                if workers != self.workers[q.name]:
                    self.workers[q.name] = workers
                    index = self.queue_index[q.name]
                    self.allowed[index] = set(workers)
                    self.dispatcher.allow(index, workers)
                    changed = True
                    logger.info(
                        "queue %r now runs on worker processes %s (one per %s handler of its %d)",
                        q.name,
                        list(workers),
                        "CPU" if which == "cpu" else "I/O",
                        k,
                    )
        return changed

    def tell(self, members: Iterable[Member]) -> None:
        """Send each live worker its handler slots, and each queue's, where they changed (a full
        ring: next time)."""
        self.slots = self.slots_needed()
        for m in members:
            per_queue = self.slots_of(m.index)
            if (
                self.told.get(m.index) != (self.slots, per_queue)
                and m.ready
                and not m.leaving
                and m.alive
                and m.inbox is not None
            ):
                # one queue: all its slots; several: each queue's
                frame = wire.slots_frame(self.slots, per_queue if len(per_queue) > 1 else ())
                try:
                    m.inbox.put_nowait(frame)
                except (RingFull, RingClosed):
                    continue
                self.told[m.index] = (self.slots, per_queue)
