"""``memory://``: an in-process broker for tests and engine-only benchmarks.

Every ``open_broker("memory://name")`` in one process returns the same broker, so a producer and a
supervisor in that process share its queues; another process sees nothing of them. It keeps the
semantics of the durable brokers: FIFO, deliveries counted, retries after a delay, dead letters
with their reason, unsettled deliveries released on close; kept results expire as SQLite's do
(the outcome at its ttl, the tombstone one ttl later).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from fastq import results as _results
from fastq.broker.base import (
    Broker,
    DeadLetter,
    Delivery,
    Message,
    Output,
    QueueDepth,
    Retry,
    Signal,
    StoredResult,
    mask_url,
    wait_either,
)
from fastq.errors import ConfigError
from fastq.workflow import run
from fastq.workflow.state import MemoryRuns, RunTx, drive

T = TypeVar("T")

logger = logging.getLogger(__name__)


class _Entry:
    __slots__ = ("attempts", "body", "headers", "message_id", "retries", "unique_key")

    def __init__(self, m: Message) -> None:
        self.body, self.message_id, self.headers = m.body, m.message_id, m.headers
        self.unique_key = m.unique_key
        self.attempts = self.retries = 0


class _Queue:
    def __init__(self) -> None:
        self.ready: deque[_Entry] = deque()
        self.delayed: list[tuple[float, int, _Entry]] = []  # heap of (visible_at, seq, entry)
        self.unacked: dict[int, _Entry] = {}
        self.dead: list[DeadLetter] = []


class MemoryBroker(Broker):
    """See the module docstring. Thread-safe; ``fetch`` wakes on a publish from any thread."""

    keeps_results = True
    atomic_outputs = True

    def __init__(self, url: str = "memory://") -> None:
        self.url = mask_url(url)
        self._lock = threading.Lock()
        self._queues: dict[str, _Queue] = {}
        self._tags = itertools.count(1)
        self._seq = itertools.count()
        self._dead_ids = itertools.count(1)
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        #: message id -> (outcome, None for a tombstone; expires_at, wall clock)
        self._results: dict[str, tuple[bytes | None, float]] = {}
        self._purges: list[tuple[float, str, float]] = []  # heap of (purge_at, id, ttl)
        #: unique key -> (the message id that holds it, until when: wall clock, inf for ever)
        self._keys: dict[str, tuple[str, float]] = {}
        #: periodic schedule -> its latest tick enqueued
        self._ticks: dict[str, float] = {}
        #: workflow runs (fastq.workflow), and the step messages they enqueued so far
        self._runs = MemoryRuns(self._enqueue_step)
        self._enqueued = 0

    def _queue(self, name: str) -> _Queue:
        q = self._queues.get(name)
        if q is None:
            q = self._queues[name] = _Queue()
        return q

    async def open(self) -> None:
        pass

    async def declare(self, queue: str) -> None:
        with self._lock:
            self._queue(queue)

    async def publish(self, queue: str, messages: Sequence[Message]) -> None:
        self.publish_sync(queue, messages)

    def publish_sync(self, queue: str, messages: Sequence[Message]) -> None:
        with self._lock:
            self._put(queue, messages)
            waiters = list(self._waiters)
        self._notify(waiters)

    def _put(self, queue: str, messages: Sequence[Message]) -> None:
        now = time.monotonic()
        q = self._queue(queue)
        for m in messages:
            if m.delay > 0:
                heapq.heappush(q.delayed, (now + m.delay, next(self._seq), _Entry(m)))
            else:
                q.ready.append(_Entry(m))

    # -- unique keys and periodic ticks -------------------------------------------------------

    def _claim(self, key: str, message_id: str, unique_for: float | None) -> str:
        now = time.time()
        held = self._keys.get(key)
        if held is not None and held[1] > now:
            return held[0]
        until = now + unique_for if unique_for is not None else float("inf")
        self._keys[key] = (message_id, until)
        return message_id

    def _free(self, key: str | None, message_id: str) -> None:
        if key is not None and self._keys.get(key, ("",))[0] == message_id:
            del self._keys[key]

    async def publish_unique(self, queue: str, message: Message) -> str:
        return self.publish_unique_sync(queue, message)

    def publish_unique_sync(self, queue: str, message: Message) -> str:
        assert message.unique_key is not None, "a unique send has a unique_key"
        with self._lock:
            holder = self._claim(message.unique_key, message.message_id, message.unique_for)
            if holder != message.message_id:
                return holder
            self._put(queue, [message])
            waiters = list(self._waiters)
        self._notify(waiters)
        return holder

    def claim_unique(self, key: str, message_id: str, unique_for: float | None) -> str:
        with self._lock:
            return self._claim(key, message_id, unique_for)

    def free_unique_sync(self, keys: Sequence[tuple[str, str]]) -> None:
        with self._lock:
            for key, message_id in keys:
                self._free(key, message_id)

    async def free_unique(self, keys: Sequence[tuple[str, str]]) -> None:
        self.free_unique_sync(keys)

    async def publish_tick(self, schedule: str, tick: float, queue: str, message: Message) -> bool:
        with self._lock:
            if self._ticks.get(schedule, float("-inf")) >= tick:
                return False
            self._ticks[schedule] = tick
            self._put(queue, [message])
            waiters = list(self._waiters)
        self._notify(waiters)
        return True

    async def last_tick(self, schedule: str) -> float | None:
        with self._lock:
            return self._ticks.get(schedule)

    @staticmethod
    def _notify(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
        for loop, event in waiters:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    def _take(self, queue: str, max_messages: int) -> tuple[list[Delivery], float | None]:
        """Deliveries now, and when the next delayed message becomes visible."""
        now = time.monotonic()
        out: list[Delivery] = []
        with self._lock:
            q = self._queue(queue)
            while q.delayed and q.delayed[0][0] <= now:
                q.ready.append(heapq.heappop(q.delayed)[2])
            while q.ready and len(out) < max_messages:
                e = q.ready.popleft()
                e.attempts += 1
                tag = next(self._tags)
                q.unacked[tag] = e
                out.append(
                    Delivery(tag, queue, e.body, e.message_id, e.attempts, e.retries, e.headers)
                )
            return out, (q.delayed[0][0] if q.delayed else None)

    async def fetch(
        self,
        queue: str,
        max_messages: int,
        *,
        timeout: float,
        wake: asyncio.Event | Signal | None = None,
    ) -> list[Delivery]:
        out, _ = self._take(queue, max_messages)
        if out or timeout <= 0 or (wake is not None and wake.is_set()):
            return out  # the busy path: no waiter to set up
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        event = asyncio.Event()
        waiter = (loop, event)
        with self._lock:
            self._waiters.add(waiter)
        try:
            while True:
                event.clear()
                out, next_visible = self._take(queue, max_messages)
                now = time.monotonic()
                if out or now >= deadline or (wake is not None and wake.is_set()):
                    return out
                wait = deadline - now if next_visible is None else min(deadline, next_visible) - now
                await wait_either(event, wake, max(wait, 0.0))
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    async def settle(
        self,
        queue: str,
        *,
        ack: Sequence[int] = (),
        retry: Sequence[Retry] = (),
        dead: Sequence[tuple[int, str]] = (),
        release: Sequence[int] = (),
    ) -> None:
        now = time.monotonic()
        with self._lock:
            q = self._queue(queue)
            for tag in ack:
                e = q.unacked.pop(tag, None)
                if e is not None and e.unique_key is not None:
                    self._free(e.unique_key, e.message_id)
            for r in retry:
                e = q.unacked.pop(r.tag, None)
                if e is not None:
                    e.retries += 1
                    heapq.heappush(q.delayed, (now + r.delay, next(self._seq), e))
            for tag, reason in dead:
                e = q.unacked.pop(tag, None)
                if e is not None:
                    self._free(e.unique_key, e.message_id)
                    q.dead.append(
                        DeadLetter(
                            next(self._dead_ids),
                            queue,
                            e.message_id,
                            e.body,
                            e.attempts,
                            e.retries,
                            reason,
                            time.time(),
                            e.headers,
                        )
                    )
            released = [
                e for e in map(q.unacked.pop, release, itertools.repeat(None)) if e is not None
            ]
            q.ready.extendleft(reversed(released))  # back at the front, in their order
            waiters = list(self._waiters) if released or retry else []
        self._notify(waiters)

    def run_transaction(
        self,
        work: Callable[[RunTx], Coroutine[Any, Any, T]],
        *,
        write: bool = True,
        outbox: list[tuple[int, Output]] | None = None,
    ) -> T:
        if outbox is not None:
            raise ConfigError(f"{self.url} keeps no workflow runs for another broker")
        with self._lock:
            before = self._enqueued
            out = drive(work(self._runs))
            waiters = list(self._waiters) if self._enqueued != before else []
        self._notify(waiters)
        return out

    def _enqueue_step(
        self, queue: str, message_id: str, body: bytes, headers: dict[str, str]
    ) -> None:
        self._put(queue, [Message(body, message_id, headers)])
        self._enqueued += 1

    async def put_results(self, results: Sequence[StoredResult]) -> None:
        now = time.time()
        with self._lock:
            before = self._enqueued
            for r in results:
                if r.step is not None:  # a workflow step's: recorded in its run, not kept
                    try:
                        drive(run.complete(self._runs, r.step, r.outcome, now))
                    except Exception:
                        logger.exception(
                            "recording step %s of run %s failed", r.step.step, r.step.run_id
                        )
                    continue
                self._results[r.message_id] = (r.outcome, now + r.ttl)
                heapq.heappush(self._purges, (now + r.ttl, r.message_id, r.ttl))
            while self._purges and self._purges[0][0] < now:
                _, message_id, ttl = heapq.heappop(self._purges)
                kept = self._results.get(message_id)
                if kept is None:
                    continue
                if kept[0] is None:
                    del self._results[message_id]
                elif kept[1] < now:  # (a later put of the same id has a later expiry)
                    self._results[message_id] = (None, kept[1])
                    heapq.heappush(self._purges, (kept[1] + ttl, message_id, ttl))
            waiters = list(self._waiters) if self._enqueued != before else []
        self._notify(waiters)

    def get_result(self, message_id: str) -> bytes | None:
        with self._lock:
            kept = self._results.get(message_id)
        if kept is None:
            return None
        return _results.unexpired(message_id, *kept)

    async def queue_depth(self, queue: str) -> QueueDepth:
        with self._lock:
            q = self._queue(queue)
            return QueueDepth(
                ready=len(q.ready), unacked=len(q.unacked), delayed=len(q.delayed), dead=len(q.dead)
            )

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, oldest first."""
        with self._lock:
            found = [d for name, q in self._queues.items() if queue in (None, name) for d in q.dead]
        return sorted(found, key=lambda d: d.id)[:limit]

    def requeue_dead_letters(
        self, ids: Sequence[int] | None = None, *, queue: str | None = None
    ) -> int:
        """Put dead letters (all, those of ``queue``, or those ``ids``) back, with fresh counts."""
        moved = 0
        with self._lock:
            for name, q in self._queues.items():
                if queue not in (None, name):
                    continue
                keep = []
                for d in q.dead:
                    if ids is None or d.id in ids:
                        q.ready.append(_Entry(Message(d.body, d.message_id, d.headers)))
                        moved += 1
                    else:
                        keep.append(d)
                q.dead = keep
            waiters = list(self._waiters)
        self._notify(waiters)
        return moved

    def dead_letter(self, id: int | str, *, queues: Sequence[str] = ()) -> DeadLetter | None:
        with self._lock:
            found = [d for q in self._queues.values() for d in q.dead if d.id == int(id)]
        return found[0] if found else None

    def purge(self, queue: str) -> int:
        with self._lock:
            q = self._queue(queue)
            gone = len(q.ready)
            for e in q.ready:  # a purged message frees its unique key, as an ack does
                self._free(e.unique_key, e.message_id)
            q.ready.clear()
        return gone

    def purge_dead_letters(self, queue: str) -> int:
        with self._lock:
            q = self._queue(queue)
            gone = len(q.dead)
            q.dead = []
        return gone

    async def close(self) -> None:
        """Release every unsettled delivery (back to the front of its queue)."""
        with self._lock:
            for q in self._queues.values():
                q.ready.extendleft(reversed(list(q.unacked.values())))
                q.unacked.clear()
