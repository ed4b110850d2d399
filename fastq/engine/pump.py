"""Each queue's one loop with the broker: settle what finished and claim what there is room
for, in one round trip, then hand the new deliveries on.

The supervisor hands every outcome (ack, retry, dead, release) to ``Pumps.settle``, which
returns at once; the queue's pump applies them with its next round trip. Everything that
finished during a round trip goes in the next one, so a busy engine pays one round trip per many
messages. A pump waits in the broker (up to ``IDLE_WAIT`` seconds) only for new messages; an
outcome to settle ends that wait at once. A failed round trip is retried with backoff, nothing
dropped (brokers settle idempotently).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastq._aio import Signal
from fastq.broker.base import Broker, Delivery, Retry
from fastq.config import Config
from fastq.engine.fleet import DeathPolicy, Fate
from fastq.errors import FastqError

if TYPE_CHECKING:
    from typing_extensions import Buffer

logger = logging.getLogger(__name__)

#: seconds a pump waits in the broker for new messages when it has nothing to settle
IDLE_WAIT = 0.25
#: seconds before a failed round trip is tried again; doubling, to at most RETRY_MAX: a broker
#: that comes back (space freed on a full disk, a restarted server) is used within a second
RETRY_MIN, RETRY_MAX = 0.25, 1.0

#: what the dispatcher routes: (tag, retries, queue index, body)
Item = tuple[int, int, int, "Buffer"]
KINDS = ("ack", "retry", "dead", "release")


class Pending:
    """A delivery handed to this host and not settled yet."""

    __slots__ = ("deaths", "delivery", "item", "queue")

    def __init__(self, queue: str, delivery: Delivery, item: Item) -> None:
        self.queue, self.delivery, self.item = queue, delivery, item
        #: deaths of workers it was on (fastq.engine.fleet.DeathPolicy)
        self.deaths = 0


def _parts() -> dict[str, list[Any]]:
    return {kind: [] for kind in KINDS}


class Pumps:
    """The pumps of every queue of one supervisor, their outcomes and their counts.

    Parameters:
        broker: the supervisor's broker (opened by it).
        config: ``batch_max`` (the most a round trip claims) and ``max_message_bytes``.
        queues: in queue-index order; ``prefetch`` is each one's host budget (changed by tuning).
        deliver: takes each round trip's new deliveries, as dispatcher items.
    """

    def __init__(
        self,
        broker: Broker,
        config: Config,
        queues: Sequence[str],
        prefetch: dict[str, int],
        deliver: Callable[[list[Item]], None],
    ) -> None:
        self.broker, self.config, self.queues, self.deliver = broker, config, list(queues), deliver
        self.queue_index = {q: i for i, q in enumerate(queues)}
        #: each queue's budget of unsettled deliveries on this host
        self.prefetch = prefetch
        self.pending: dict[int, Pending] = {}
        self.tags = itertools.count(1)
        self.in_flight = dict.fromkeys(queues, 0)
        #: per queue: outcomes waiting for its pump, those it is applying now, and its wake-up
        self.outcomes: dict[str, dict[str, list[Any]]] = {q: _parts() for q in queues}
        self.settling: dict[str, dict[str, list[Any]]] = {}
        self.wake = {q: Signal() for q in queues}
        #: settled at the broker since the start: by kind, and by queue
        self.settled = collections.Counter[str]()
        self.settled_by_queue = collections.Counter[str]()
        self.settled_event = Signal()
        #: no more claims (draining); outcomes are still settled
        self.stopping = False

    def stop(self) -> None:
        """Claim no more; a pump waiting for new messages stops waiting now."""
        self.stopping = True
        for wake in self.wake.values():
            wake.set()

    async def run(self, queue: str) -> None:
        """The queue's pump (see the module docstring); runs until cancelled."""
        wake, limit, index = (
            self.wake[queue],
            self.config.max_message_bytes,
            self.queue_index[queue],
        )
        pause, failures = RETRY_MIN, 0
        while True:
            wake.clear()
            parts = self.outcomes[queue]
            settling = sum(map(len, parts.values()))
            room = 0 if self.stopping else self.prefetch[queue] - self.in_flight[queue] + settling
            want = min(room, self.config.batch_max)
            if not settling and want <= 0:
                await wake.wait()
                continue
            self.outcomes[queue], self.settling[queue] = _parts(), parts
            try:
                deliveries = await self.broker.exchange(
                    queue,
                    **parts,
                    fetch=max(want, 0),
                    timeout=0.0 if settling else IDLE_WAIT,
                    wake=wake,
                )
            except Exception as e:
                if not isinstance(e, FastqError):
                    logger.exception(
                        "settling %d and fetching %d messages on %r failed; retrying in %.1f s",
                        settling,
                        max(want, 0),
                        queue,
                        pause,
                    )
                elif failures % 60 == 0:  # the broker said what is wrong: once a minute is enough
                    logger.error("%s; retrying every %g s at most", e, RETRY_MAX)
                failures += 1
                for kind, items in parts.items():  # in front of what came meanwhile
                    self.outcomes[queue][kind][:0] = items
                del self.settling[queue]
                await asyncio.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)
                continue
            if failures:
                logger.warning(
                    "settling and fetching on %r works again after %d failed tries", queue, failures
                )
            pause, failures = RETRY_MIN, 0
            del self.settling[queue]
            if settling:
                self.in_flight[queue] -= settling
                self.settled_by_queue[queue] += settling
                for kind, items in parts.items():
                    self.settled[kind] += len(items)
                self.settled_event.set()
            items, too_large = [], []
            for d in deliveries:
                tag = next(self.tags)
                p = self.pending[tag] = Pending(queue, d, (tag, d.retries, index, d.body))
                self.in_flight[queue] += 1
                if len(d.body) > limit:
                    too_large.append(
                        (tag, f"message of {len(d.body)} bytes exceeds max_message_bytes={limit}")
                    )
                else:
                    items.append(p.item)
            if too_large:
                self.settle(dead=too_large)
            if deliveries:
                self.deliver(items)

    def settle(
        self,
        ack: Sequence[int] = (),
        retry: Sequence[tuple[int, float, str]] = (),
        dead: Sequence[tuple[int, str]] = (),
        release: Sequence[int] = (),
    ) -> None:
        """Hand outcomes (by tag) to their queues' pumps and return; ``flush`` waits until they
        are applied at the broker."""
        pending = self.pending
        for tag in ack:
            p = pending.pop(tag)
            self._outcome(p, "ack", p.delivery.tag)
        for tag, delay, reason in retry:
            p = pending.pop(tag)
            self._outcome(p, "retry", Retry(p.delivery.tag, delay, reason))
        for tag, reason in dead:
            p = pending.pop(tag)
            logger.warning("dead letter %s on %r: %s", p.delivery.message_id, p.queue, reason)
            self._outcome(p, "dead", (p.delivery.tag, reason))
        for tag in release:
            p = pending.pop(tag)
            self._outcome(p, "release", p.delivery.tag)

    def _outcome(self, p: Pending, kind: str, item: Any) -> None:
        self.outcomes[p.queue][kind].append(item)
        self.wake[p.queue].set()

    def lost(
        self, tags: Sequence[int], solo: int | None, policy: DeathPolicy, *, died: bool
    ) -> tuple[list[Item], list[int], list[int]]:
        """What becomes of the deliveries ``tags`` that a worker held when it exited: by
        ``policy`` if it ``died`` (``solo``: the one it ran alone), else (it recycled) each goes
        on as it was. Returns the items to dispatch again, the tags of suspects (to run alone)
        and the tags to dead-letter."""
        again: list[Item] = []
        suspects, dead = [], []
        for tag in tags:
            p = self.pending[tag]
            fate = Fate.SUSPECT if p.deaths else Fate.AGAIN
            if died:
                p.deaths, fate = policy.after_death(p.deaths, alone=solo == tag)
            if fate is Fate.GIVE_UP:
                dead.append(tag)
            elif fate is Fate.SUSPECT:
                suspects.append(tag)
            else:
                again.append(p.item)
        return again, suspects, dead

    def unsettled(self) -> int:
        """Outcomes given to ``settle`` and not applied at the broker yet."""
        return sum(
            len(v)
            for parts in (*self.outcomes.values(), *self.settling.values())
            for v in parts.values()
        )

    async def wait_settled(self, count: int, kind: str = "ack") -> None:
        """Wait until ``count`` messages were settled as ``kind`` ("ack", "retry", "dead",
        "release") at the broker since the start."""
        while self.settled[kind] < count:
            self.settled_event.clear()
            await self.settled_event.wait()

    async def flush(self, tasks: Sequence[asyncio.Task[None]]) -> None:
        """Wait until every outcome given to ``settle`` is applied at the broker by the pump
        ``tasks`` (or they all ended)."""
        while self.unsettled() and not all(t.done() for t in tasks):
            self.settled_event.clear()
            await self.settled_event.wait()
        if self.unsettled():  # the pumps failed (logged): the broker's leases bring them back
            logger.error("%d outcomes were not settled", self.unsettled())
