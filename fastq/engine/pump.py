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

from fastq import results as _results
from fastq import wire
from fastq._aio import Signal
from fastq._notify import Poker
from fastq.broker.base import (
    UNIQUE_HEADER,
    Broker,
    Delivery,
    Message,
    Output,
    Retry,
    StoredResult,
)
from fastq.config import Config
from fastq.engine.fleet import DeathPolicy, Fate
from fastq.engine.outbox import StoreOutbox
from fastq.errors import FastqError
from fastq.wire import Returned
from fastq.workflow.state import ref_of

if TYPE_CHECKING:
    from typing_extensions import Buffer

logger = logging.getLogger(__name__)

#: seconds a pump waits in the broker for new messages when it has nothing to settle
IDLE_WAIT = 0.25
#: seconds before a failed round trip is tried again; doubling, to at most RETRY_MAX: a broker
#: that comes back (space freed on a full disk, a restarted server) is used within a second
RETRY_MIN, RETRY_MAX = 0.25, 1.0

#: outcomes of a queue that may wait for their outputs' confirms (brokers without transactions:
#: RabbitMQ confirms a persistent message once it is on disk, tens of milliseconds under load),
#: beyond its prefetch: done work, not hoarded work, so the broker's qos for a queue that
#: publishes is its prefetch plus this, and the pump claims while they wait
CONFIRM_ALLOWANCE = 500

#: what the dispatcher routes: (tag, retries, queue index, body)
Item = tuple[int, int, int, "Buffer"]
KINDS = ("ack", "retry", "dead", "release")
#: what rides along with the outcomes, in the same round trip: kept results, published outputs,
#: replies to callers waiting on RabbitMQ's direct reply-to
EXTRAS = ("results", "outputs", "replies")


class Pending:
    """A delivery handed to this host and not settled yet."""

    __slots__ = ("deaths", "delivery", "item", "queue")

    def __init__(self, queue: str, delivery: Delivery, item: Item) -> None:
        self.queue, self.delivery, self.item = queue, delivery, item
        #: deaths of workers it was on (fastq.engine.fleet.DeathPolicy)
        self.deaths = 0


def _parts() -> dict[str, list[Any]]:
    return {kind: [] for kind in (*KINDS, *EXTRAS)}


def _outcomes(parts: dict[str, list[Any]]) -> int:
    return sum(len(parts[kind]) for kind in KINDS)


class Pumps:
    """The pumps of every queue of one supervisor, their outcomes and their counts.

    Parameters:
        broker: the supervisor's broker (opened by it).
        config: ``batch_max`` (the most a round trip claims) and ``max_message_bytes``.
        queues: in queue-index order; ``prefetch`` is each one's host budget (changed by tuning).
        deliver: takes each round trip's new deliveries, as dispatcher items.
        store: where results are kept when it is not the broker (``App(result_store=...)``):
            written before the round trip that acks their messages.
    """

    def __init__(
        self,
        broker: Broker,
        config: Config,
        queues: Sequence[str],
        prefetch: dict[str, int],
        deliver: Callable[[list[Item]], None],
        store: Broker | None = None,
        *,
        publishing: set[str] | frozenset[str] = frozenset(),
        with_headers: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        self.broker, self.config, self.queues, self.deliver = broker, config, list(queues), deliver
        self.store = store
        #: results have somewhere to go; else (a call's on a broker that keeps none) dropped
        self.keeps_results = store is not None or getattr(broker, "keeps_results", False)
        self.poker: Poker | None = None  # made at the first result that someone waits for
        self.queue_index = {q: i for i, q in enumerate(queues)}
        #: queues whose deliveries reach the workers with their broker headers (wire.WITH_HEADERS)
        self.with_headers = with_headers
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
        #: where outputs are not written in the ack's transaction (RabbitMQ: a publish confirm
        #: takes a disk write, milliseconds), the outcomes that carry outputs, replies or results
        #: for another store go in batches of their own, each published then acked by a task of
        #: its own, so that the pump goes on claiming and settling the rest meanwhile
        self.defer = not getattr(broker, "atomic_outputs", True)
        #: the queues whose handlers publish (publish_to): their confirms get an allowance
        self.publishing_queues = set(publishing) if self.defer else set()
        self.carrying: dict[str, dict[str, list[Any]]] = {q: _parts() for q in queues}
        self.publishing: dict[str, list[dict[str, list[Any]]]] = {q: [] for q in queues}
        self.publishers: set[asyncio.Task[None]] = set()
        #: unique keys held in the result store (a broker that keeps none: RabbitMQ), freed
        #: once their messages are acked or dead-lettered: (queue, tag) -> (key, message id)
        self.frees_keys = store is not None and not getattr(broker, "keeps_unique_keys", True)
        self.keys: dict[tuple[str, int], tuple[str, str]] = {}
        #: the store's workflow outbox, where the store keeps the runs and the broker none
        self.outbox: StoreOutbox | None = None
        if store is not None and not broker.keeps_runs and store.keeps_runs_for_others:
            self.outbox = StoreOutbox(broker, store)

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
            carrying = self.carrying[queue]
            if _outcomes(carrying) and not self.publishing[queue]:  # one batch at a time: the
                # next gathers what finished meanwhile, one confirm wait for many
                self.carrying[queue] = _parts()
                self.publishing[queue].append(carrying)
                t = asyncio.create_task(self.publish_then_settle(queue, carrying))
                self.publishers.add(t)
                t.add_done_callback(self.publishers.discard)
            parts = self.outcomes[queue]
            settling = _outcomes(parts)
            confirming = min(self.confirming(queue), self.allowance(queue))
            room = (
                0
                if self.stopping
                else self.prefetch[queue] - self.in_flight[queue] + settling + confirming
            )
            want = min(room, self.config.batch_max)
            if not settling and want <= 0:
                await wake.wait()
                continue
            self.outcomes[queue], self.settling[queue] = _parts(), parts
            results: list[StoredResult] = parts["results"]
            try:
                if results and self.store is not None:
                    parts = await self.stored(parts)
                deliveries = await self.broker.exchange(
                    queue,
                    **parts,
                    fetch=max(want, 0),
                    timeout=0.0 if settling else IDLE_WAIT,
                    wake=wake,
                )
                if self.outbox is not None:
                    await self.outbox.published(parts["outputs"])
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
            self.wake_waiters(results)
            if settling:
                self.count_settled(queue, parts)
            items, too_large = [], []
            carry = queue in self.with_headers
            for d in deliveries:
                tag = next(self.tags)
                if carry and d.headers:
                    body = wire.with_headers(d.headers, d.body)
                    item: Item = (tag, d.retries | wire.WITH_HEADERS, index, body)
                else:
                    item = (tag, d.retries, index, d.body)
                p = self.pending[tag] = Pending(queue, d, item)
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

    async def stored(self, parts: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """``parts`` with their results written to ``store`` first, where results are kept
        apart from the broker (then the broker's round trip has none left to write). Workflow
        steps' outcomes too, where the broker keeps no runs (RabbitMQ): the store records them
        and keeps the messages they made ready in its outbox, which go out with the outputs,
        confirmed before the ack (``StoreOutbox``, fastq.engine.outbox, then lets them go)."""
        if self.store is None or not parts["results"]:
            return parts
        results = parts["results"]
        steps = [r for r in results if r.step is not None] if self.outbox is not None else []
        if steps:
            results = [r for r in results if r.step is None]
        if results:
            await self.store.put_results(results)
        if not steps:
            return {**parts, "results": []}
        assert self.outbox is not None
        made = await self.outbox.record(steps)
        return {**parts, "results": [], "outputs": [*parts["outputs"], *made]}

    def allowance(self, queue: str) -> int:
        return CONFIRM_ALLOWANCE if queue in self.publishing_queues else 0

    def qos(self, queue: str) -> int:
        """What the broker may hold unacked for ``queue`` on this host: its prefetch, plus the
        allowance for outcomes waiting for their outputs' confirms."""
        return self.prefetch[queue] + self.allowance(queue)

    def confirming(self, queue: str) -> int:
        """Outcomes of ``queue`` done and waiting for their outputs to be confirmed."""
        return _outcomes(self.carrying[queue]) + sum(map(_outcomes, self.publishing[queue]))

    def count_settled(self, queue: str, parts: dict[str, list[Any]]) -> None:
        if self.keys:
            self.free_keys(queue, parts)
        settled = _outcomes(parts)
        self.in_flight[queue] -= settled
        self.settled_by_queue[queue] += settled
        for kind in KINDS:
            self.settled[kind] += len(parts[kind])
        self.settled_event.set()

    async def publish_then_settle(self, queue: str, parts: dict[str, list[Any]]) -> None:
        """One batch of outcomes that carry outputs (``defer``): publish them, confirmed, then
        settle; tried again with backoff until it works (at least once: an output may go twice,
        never an input acked before its outputs)."""
        batch, results = parts, parts["results"]
        pause, failures = RETRY_MIN, 0
        try:
            while True:
                try:
                    parts = await self.stored(parts)
                    await self.broker.exchange(queue, **parts, fetch=0, timeout=0.0, wake=None)
                    if self.outbox is not None:
                        await self.outbox.published(parts["outputs"])
                    break
                except Exception as e:  # noqa: BLE001 - whatever it was, the batch is tried again
                    if failures % 60 == 0:
                        logger.error(
                            "publishing %d outputs of %r, then settling, failed (%s); retrying "
                            "every %g s at most",
                            len(parts["outputs"]) + len(parts["replies"]),
                            queue,
                            e if isinstance(e, FastqError) else repr(e),
                            RETRY_MAX,
                        )
                    failures += 1
                    await asyncio.sleep(pause)
                    pause = min(pause * 2, RETRY_MAX)
            self.wake_waiters(results)
            self.count_settled(queue, parts)
        finally:
            self.publishing[queue] = [b for b in self.publishing[queue] if b is not batch]
            self.wake[queue].set()  # room for the next batch, and for claims

    def settle(
        self,
        ack: Sequence[int] = (),
        retry: Sequence[tuple[int, float, str]] = (),
        dead: Sequence[tuple[int, str]] = (),
        release: Sequence[int] = (),
        returned: Sequence[tuple[int, Returned]] = (),
    ) -> None:
        """Hand outcomes (by tag) to their queues' pumps and return; ``flush`` waits until they
        are applied at the broker. ``returned`` are the deliveries with a result to keep or
        outputs to publish (``wire.Returned``): acked (dead, with a ``reason``) in the same round
        trip that stores and publishes them."""
        pending = self.pending
        for tag, r in returned:
            p = pending.pop(tag)
            carries = r.outputs or (r.keep and (p.delivery.reply_to or self.store is not None))
            parts = (self.carrying if self.defer and carries else self.outcomes)[p.queue]
            if r.keep:
                d = p.delivery
                step = ref_of(d.headers, d.retries + 1)  # a workflow step's: its run moves on
                kept = StoredResult(
                    d.message_id, r.handler, r.outcome, r.keep, r.notify, d.reply_to, step
                )
                if d.reply_to:
                    parts["replies"].append(kept)
                if self.keeps_results:
                    parts["results"].append(kept)
                elif not d.reply_to:
                    logger.warning(
                        "the result of %s is not kept: %s", d.message_id, self.broker.no_results()
                    )
            if r.outputs:
                parts["outputs"].extend(
                    Output(
                        o.queue,
                        Message(o.body, o.message_id, o.headers),
                        o.exchange,
                        o.exchange_kind,
                        o.routing_key,
                    )
                    for o in r.outputs
                )
            self.hold_key(p)
            if r.reason:
                logger.warning(
                    "dead letter %s on %r: %s",
                    p.delivery.message_id,
                    p.queue,
                    r.reason,
                    extra={"queue": p.queue, "message_id": p.delivery.message_id},
                )
                parts["dead"].append((p.delivery.tag, r.reason))
            else:
                parts["ack"].append(p.delivery.tag)
            self.wake[p.queue].set()
        for tag in ack:
            p = pending.pop(tag)
            if self.frees_keys:
                self.hold_key(p)
            self._outcome(p, "ack", p.delivery.tag)
        for tag, delay, reason in retry:
            p = pending.pop(tag)
            self._outcome(p, "retry", Retry(p.delivery.tag, delay, reason))
        for tag, reason in dead:
            p = pending.pop(tag)
            self.hold_key(p)
            step = ref_of(p.delivery.headers, p.delivery.retries + 1)
            if step is not None:  # dead with no outcome (its workers died): its step failed
                failed = _results.failure("", "", "", reason)
                kept = StoredResult(p.delivery.message_id, "", failed, 1.0, step=step)
                self.outcomes[p.queue]["results"].append(kept)
            logger.warning(
                "dead letter %s on %r: %s",
                p.delivery.message_id,
                p.queue,
                reason,
                extra={"queue": p.queue, "message_id": p.delivery.message_id},
            )
            self._outcome(p, "dead", (p.delivery.tag, reason))
        for tag in release:
            p = pending.pop(tag)
            self._outcome(p, "release", p.delivery.tag)

    def hold_key(self, p: Pending) -> None:
        """``p`` is done for good: its unique key is to be freed once that is settled."""
        headers = p.delivery.headers
        if self.frees_keys and headers and UNIQUE_HEADER in headers:
            self.keys[(p.queue, p.delivery.tag)] = (headers[UNIQUE_HEADER], p.delivery.message_id)

    def free_keys(self, queue: str, parts: dict[str, list[Any]]) -> None:
        tags = [*parts["ack"], *(tag for tag, _ in parts["dead"])]
        freed = [k for k in (self.keys.pop((queue, t), None) for t in tags) if k is not None]
        if freed and self.store is not None:
            t = asyncio.get_running_loop().create_task(self.store.free_unique(freed))
            self.publishers.add(t)
            t.add_done_callback(self._freed)

    def _freed(self, t: asyncio.Task[None]) -> None:
        self.publishers.discard(t)
        if not t.cancelled() and t.exception() is not None:
            logger.warning("freeing unique keys in the result store failed: %s", t.exception())

    def wake_waiters(self, results: Sequence[StoredResult]) -> None:
        """Poke the processes waiting for ``results``, now stored (``fastq._notify``)."""
        pokes = [(r.notify, r.message_id) for r in results if r.notify]
        if pokes:
            if self.poker is None:
                self.poker = Poker()
            self.poker.poke(pokes)

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
        publishing = [b for batches in self.publishing.values() for b in batches]
        return sum(
            _outcomes(parts)
            for parts in (
                *self.outcomes.values(),
                *self.settling.values(),
                *self.carrying.values(),
                *publishing,
            )
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
