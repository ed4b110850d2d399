"""The async Broker interface every backend implements, and the values that cross it.

Only the supervisor talks to a broker (workers never do). It fetches deliveries in batches, hands
them to workers, and settles them in batches: ack when the handler finished, retry with a delay,
dead-letter with a reason, or release (give back, unfinished). Producers publish, synchronously
(``task.send``) or not. At-least-once: a delivery that is never settled comes back.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import msgspec

from fastq._aio import Signal, wait_either
from fastq.config import EXCHANGE_KINDS, QueueOptions
from fastq.errors import ConfigError
from fastq.url import mask_url, scrub
from fastq.workflow.state import RunTx, StepRef

T = TypeVar("T")

logger = logging.getLogger(__name__)

__all__ = [
    "EXCHANGE_KINDS",
    "UNIQUE_HEADER",
    "Broker",
    "DeadLetter",
    "Delivery",
    "ExchangeBroker",
    "Message",
    "Output",
    "QueueDepth",
    "QueueOptions",
    "Retry",
    "Signal",
    "StoredResult",
    "mask_url",
    "pack_headers",
    "query_float",
    "scrub",
    "unpack_headers",
    "wait_either",
]


#: the header of a unique message: its key (where a result store holds the keys, the supervisor
#: frees it there when the message is acked or dead-lettered)
UNIQUE_HEADER = "fastq-unique"


class Message(msgspec.Struct, frozen=True, gc=False):
    """One message to publish."""

    body: bytes
    message_id: str
    headers: dict[str, str] | None = None
    #: seconds before it may be delivered
    delay: float = 0.0
    #: a unique send (``unique=True`` / ``unique_key=``): while a message with this key is queued
    #: or running, another one with it is not enqueued (``Broker.publish_unique``)
    unique_key: str | None = None
    #: seconds the key holds at most (None: until the message is acked or dead-lettered)
    unique_for: float | None = None


class Delivery(msgspec.Struct, gc=False):
    """One message handed to this consumer; settle it by ``tag``."""

    tag: int
    queue: str
    body: bytes
    message_id: str
    #: deliveries so far, this one included (1 on the first); crashes and releases count
    attempts: int
    #: times it failed and was scheduled again (settle(retry=...)); what max_retries counts
    retries: int = 0
    headers: dict[str, str] | None = None
    #: where its caller waits for the result (RabbitMQ's direct reply-to); "" : nobody
    reply_to: str = ""


_headers_encoder = msgspec.msgpack.Encoder()
_headers_decoder = msgspec.msgpack.Decoder(dict[str, str])


def pack_headers(headers: dict[str, str] | None) -> bytes | None:
    """Headers as the SQL brokers store them (msgpack; None when there are none)."""
    return None if not headers else _headers_encoder.encode(headers)


def unpack_headers(raw: bytes | None) -> dict[str, str] | None:
    """Headers as stored; ones that do not decode (another writer's) are dropped with a warning,
    so that a claimed message is still delivered instead of staying leased."""
    if raw is None:
        return None
    try:
        return _headers_decoder.decode(raw)
    except msgspec.DecodeError as e:
        logger.warning("dropping stored headers that are not a msgpack map of strings: %s", e)
        return None


class Retry(msgspec.Struct, frozen=True, gc=False):
    tag: int
    delay: float
    reason: str


class DeadLetter(msgspec.Struct, frozen=True, gc=False):
    """A message that failed for good, kept with the reason."""

    id: int
    queue: str
    message_id: str
    body: bytes
    attempts: int
    retries: int
    reason: str
    failed_at: float
    headers: dict[str, str] | None = None

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> DeadLetter:
        """From a SQL row: id, queue, message_id, body, attempts, retries, reason, failed_at,
        headers (packed)."""
        return cls(r[0], r[1], r[2], bytes(r[3]), r[4], r[5], r[6], r[7], unpack_headers(r[8]))


class StoredResult(msgspec.Struct, frozen=True, gc=False):
    """A handler's outcome to keep (``fastq.results``): written by the supervisor, read by
    ``task.result``."""

    message_id: str
    #: the task's (or consumer's) name
    handler: str
    #: a ``fastq.results.Outcome``, msgpack
    outcome: bytes
    #: seconds to keep it
    ttl: float
    #: who waits for it: a ``fastq._notify`` address to poke once it is stored ("" : nobody)
    notify: str = ""
    #: where to send it as a reply instead (the delivery's reply_to: RabbitMQ direct reply-to)
    reply_to: str = ""
    #: the workflow step it is the outcome of: a broker that ``keeps_runs`` records it in its
    #: run (``fastq.workflow.run.complete``) and enqueues what follows, instead of keeping it
    step: StepRef | None = None


class Output(msgspec.Struct, frozen=True, gc=False):
    """A message a handler produced (``publish_to``): published before its input is acked."""

    queue: str
    message: Message
    #: to an exchange instead (``fastq.Route``; ``queue`` is then ""): name, kind, routing key
    exchange: str = ""
    exchange_kind: str = ""
    routing_key: str = ""


class QueueDepth(msgspec.Struct, frozen=True):
    #: deliverable now
    ready: int
    #: delivered and not settled yet
    unacked: int
    #: waiting for a retry delay to pass
    delayed: int = 0
    #: failed for good (dead letters kept)
    dead: int = 0
    #: consumers attached now, where the broker says (RabbitMQ)
    consumers: int | None = None
    #: where ``unacked`` comes from when it is not the whole broker's count: "this process"
    #: (RabbitMQ without its management API, which alone counts unacked messages of every host)
    unacked_scope: str = "all"


class Broker(abc.ABC):
    """A queue backend. Every method is safe to call from the one event loop that opened it,
    except ``publish_sync`` and ``get_result``, which any thread may call."""

    #: The URL with its password masked: the only form that goes into logs and errors.
    url: str
    #: it keeps results in its own storage (``exchange(results=...)`` writes them with the ack)
    keeps_results = False
    #: ``task.call`` gets its reply straight back (``call_sync``, ``call_async``), no store
    replies_directly = False
    #: ``exchange`` writes outputs and results in the ack's own transaction (or at once, in
    #: process): the supervisor need not take them apart from the other outcomes
    atomic_outputs = False
    #: what is delivered and not settled costs the broker (RabbitMQ's queue and channel
    #: processes track every unacked message, on cores shared with the handlers): autosize keeps
    #: an I/O queue's prefetch beyond its handlers to what the formula's 100 handlers had
    unsettled_costs = False

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and prepare storage; idempotent."""

    def configure(self, queue: str, options: QueueOptions) -> None:
        """How ``queue`` is declared and bound, and where ``publish`` to it goes (exchange and
        routing key); brokers without exchanges ignore it."""

    @abc.abstractmethod
    async def declare(self, queue: str) -> None:
        """Make sure ``queue`` exists (durable where the backend is)."""

    @abc.abstractmethod
    async def publish(self, queue: str, messages: Sequence[Message]) -> None:
        """Publish in order; returns once the broker holds them (durably, where it is durable)."""

    @abc.abstractmethod
    def publish_sync(self, queue: str, messages: Sequence[Message]) -> None:
        """``publish`` for code without an event loop, such as ``task.send()``."""

    @abc.abstractmethod
    async def fetch(
        self,
        queue: str,
        max_messages: int,
        *,
        timeout: float,
        wake: asyncio.Event | Signal | None = None,
    ) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, waiting at most ``timeout`` seconds for the first;
        a wait also ends (with what there is, maybe nothing) as soon as ``wake`` is set."""

    @abc.abstractmethod
    async def settle(
        self,
        queue: str,
        *,
        ack: Sequence[int] = (),
        retry: Sequence[Retry] = (),
        dead: Sequence[tuple[int, str]] = (),
        release: Sequence[int] = (),
    ) -> None:
        """Settle deliveries in one round trip: ack (done), retry (again after a delay),
        dead-letter (with a reason), release (unfinished: deliverable again now)."""

    async def exchange(
        self,
        queue: str,
        *,
        ack: Sequence[int] = (),
        retry: Sequence[Retry] = (),
        dead: Sequence[tuple[int, str]] = (),
        release: Sequence[int] = (),
        results: Sequence[StoredResult] = (),
        outputs: Sequence[Output] = (),
        replies: Sequence[StoredResult] = (),
        fetch: int = 0,
        timeout: float = 0.0,
        wake: asyncio.Event | Signal | None = None,
    ) -> list[Delivery]:
        """Settle as ``settle`` does, then take up to ``fetch`` deliveries as ``fetch`` does: what
        a consumer does after each batch of work. Backends that can do both in one round trip
        override this; the supervisor calls nothing else on its hot path.

        ``outputs`` (what handlers produced) are published, ``results`` stored (only where
        ``keeps_results``) and ``replies`` sent to their callers (only where deliveries carry a
        ``reply_to``), before anything is settled: an input is never acked before what it
        produced is durable. A backend with transactions does all of it in one.

        When it raises, the supervisor sends the same outcomes again later, so settling must be
        idempotent (a tag settled already is ignored), and deliveries taken before the error
        must come back to some consumer (a lease that lapses, a channel that closes). The
        default settles, then fetches: a failed fetch settles again next time, which the
        memory and SQLite brokers ignore.
        """
        if outputs:
            await self.publish_outputs(outputs)
        if results:
            await self.put_results(results)
        if replies:
            await self.reply(replies)
        if ack or retry or dead or release:
            await self.settle(queue, ack=ack, retry=retry, dead=dead, release=release)
        if fetch <= 0:
            return []
        return await self.fetch(queue, fetch, timeout=timeout, wake=wake)

    async def publish_outputs(self, outputs: Sequence[Output]) -> None:
        """Publish ``outputs``, grouped by queue (or route) in their order, each group
        confirmed."""
        by_queue: dict[str, list[Message]] = {}
        by_route: dict[tuple[str, str, str], list[Message]] = {}
        for o in outputs:
            if o.exchange:
                by_route.setdefault((o.exchange, o.exchange_kind, o.routing_key), []).append(
                    o.message
                )
            else:
                by_queue.setdefault(o.queue, []).append(o.message)
        for queue, messages in by_queue.items():
            await self.publish(queue, messages)
        for (exchange, kind, routing_key), messages in by_route.items():
            await self.publish_routed(exchange, kind, routing_key, messages)

    #: it has exchanges: ``publish_to=fastq.Route(...)`` works (RabbitMQ)
    has_exchanges = False

    async def declare_exchange(self, exchange: str, kind: str) -> None:
        """Make sure the exchange exists (brokers that ``has_exchanges``)."""
        raise ConfigError(f"{self.url} has no exchanges")

    async def publish_routed(
        self, exchange: str, kind: str, routing_key: str, messages: Sequence[Message]
    ) -> None:
        """Publish to an exchange (declared as ``kind`` if need be), confirmed, not mandatory."""
        raise ConfigError(
            f"publish_to=Route(exchange={exchange!r}) needs a broker with exchanges "
            f"(amqp://); {self.url} has queues only: publish_to a queue name"
        )

    def call_sync(self, queue: str, m: Message, timeout: float | None) -> bytes:
        """Publish ``m`` as a call and wait for its outcome (``replies_directly`` brokers)."""
        raise NotImplementedError(f"{self.url} has no direct replies")

    async def call_async(self, queue: str, m: Message, timeout: float | None) -> bytes:
        """``call_sync`` for coroutines."""
        raise NotImplementedError(f"{self.url} has no direct replies")

    async def reply(self, replies: Sequence[StoredResult]) -> None:
        """Send each outcome to its ``reply_to``; only brokers whose deliveries carry one."""
        raise NotImplementedError(f"{self.url} has no replies")

    async def put_results(self, results: Sequence[StoredResult]) -> None:
        """Store ``results`` (durably, where the broker is); a broker that keeps none says so."""
        raise ConfigError(self.no_results())

    def get_result(self, message_id: str) -> bytes | None:
        """The stored outcome of ``message_id`` (``fastq.results.Outcome``), or None while there
        is none. Any thread.

        Raises:
            ResultExpired: it was kept and its ttl passed.
        """
        raise ConfigError(self.no_results())

    def no_results(self) -> str:
        return (
            f"{self.url} keeps no results; give the App a result store: "
            "App(..., result_store='sqlite:///results.db')"
        )

    async def prefetch(self, queue: str, prefetch: int) -> None:
        """The host's budget of unsettled deliveries of ``queue`` (the supervisor's, whole):
        a broker that pushes (RabbitMQ's ``basic.qos``) holds no more than this. Brokers that
        are asked (``fetch``) need not do anything."""

    # -- workflows: run state (``fastq.workflow``) ----------------------------------------------

    @property
    def keeps_runs(self) -> bool:
        """It keeps workflow runs in its own store (it implements ``run_transaction``)."""
        return type(self).run_transaction is not Broker.run_transaction

    def run_transaction(
        self,
        work: Callable[[RunTx], Coroutine[Any, Any, T]],
        *,
        write: bool = True,
        outbox: list[tuple[int, Output]] | None = None,
    ) -> T:
        """Run ``work`` (a coroutine function: ``fastq.workflow.run``'s) on this broker's
        workflow run state in one transaction (any thread, not a running event loop's):
        what it reads is consistent, what it writes and enqueues is committed together or not
        at all (``write=False``: it only reads, and takes no write lock). Step outcomes
        (``StoredResult.step``) go through ``exchange(results=...)``, in their ack's
        transaction. ``outbox``: as another broker's result store, what ``work`` enqueues goes
        to the outbox (and to this list, with the ids) for the caller to publish elsewhere.

        Raises:
            ConfigError: this broker keeps no runs (the message names those that do).
        """
        raise ConfigError(
            f"{self.url} keeps no workflow runs; the memory://, sqlite:// and postgresql:// "
            "brokers do"
        )

    @property
    def keeps_runs_for_others(self) -> bool:
        """As a result store, it keeps the runs of a broker that keeps none (``record_steps``)."""
        return type(self).record_steps is not Broker.record_steps

    async def record_steps(self, steps: Sequence[StoredResult]) -> list[tuple[int, Output]]:
        """As a result store (``App(result_store=...)``) for a broker that keeps no runs
        (RabbitMQ): record these workflow steps' outcomes in one transaction and keep the
        messages they made ready in an outbox; those messages, with their outbox ids. The
        supervisor publishes them (confirmed) before it acks the steps, then ``outbox_done``."""
        raise ConfigError(f"{self.url} keeps no workflow runs for another broker")

    async def outbox_done(self, ids: Sequence[int]) -> None:
        """These outbox messages were published: forget them."""
        raise ConfigError(f"{self.url} keeps no workflow runs for another broker")

    def outbox_done_sync(self, ids: Sequence[int]) -> None:
        """``outbox_done`` for code without an event loop (any thread)."""
        raise ConfigError(f"{self.url} keeps no workflow runs for another broker")

    async def pending_outbox(self) -> list[tuple[int, Output]]:
        """Outbox messages never published (a supervisor died between record and publish)."""
        raise ConfigError(f"{self.url} keeps no workflow runs for another broker")

    # -- scheduling: unique sends, periodic ticks, the caller's transaction ------------------

    async def publish_unique(self, queue: str, message: Message) -> str:
        """Publish ``message`` (its ``unique_key`` set) unless a message with that key is queued
        or running (and its ``unique_for`` has not passed); the id of the message that holds the
        key: ``message.message_id`` when this call enqueued it, else the earlier one's. The key
        frees when its message is acked or dead-lettered (not when it is retried).

        Raises:
            ConfigError: this broker cannot keep keys (the message says what to configure).
        """
        raise ConfigError(f"{self.url} cannot keep unique keys")

    def publish_unique_sync(self, queue: str, message: Message) -> str:
        """``publish_unique`` for code without an event loop (any thread)."""
        raise ConfigError(f"{self.url} cannot keep unique keys")

    @property
    def keeps_unique_keys(self) -> bool:
        """It keeps unique keys itself (it implements ``publish_unique_sync``); else a unique
        send needs the App's result store (``claim_unique``)."""
        return type(self).publish_unique_sync is not Broker.publish_unique_sync

    def claim_unique(self, key: str, message_id: str, unique_for: float | None) -> str:
        """As a result store (``App(result_store=...)``) for a broker that keeps no keys: take
        ``key`` for ``message_id`` unless another message holds it (and its ``unique_for`` has
        not passed); the holder's id. Any thread."""
        raise ConfigError(f"{self.url} cannot keep unique keys")

    def free_unique_sync(self, keys: Sequence[tuple[str, str]]) -> None:
        """Free each ``(key, message_id)`` that message still holds (``claim_unique``)."""
        raise ConfigError(f"{self.url} cannot keep unique keys")

    async def free_unique(self, keys: Sequence[tuple[str, str]]) -> None:
        """``free_unique_sync`` on the loop: the supervisor's, when those messages were acked or
        dead-lettered."""
        raise ConfigError(f"{self.url} cannot keep unique keys")

    async def lead(self, group: str) -> None:
        """Join the election of the one process that publishes ``group``'s periodic ticks
        (``leading``). The default does nothing: ``publish_tick`` is exactly-once by itself
        (the SQL brokers), so every supervisor publishes."""

    def leading(self, group: str) -> bool:
        """This process publishes ``group``'s ticks now (see ``lead``); the default: always."""
        return True

    async def publish_tick(self, schedule: str, tick: float, queue: str, message: Message) -> bool:
        """Enqueue ``message`` for tick ``tick`` (epoch seconds) of periodic ``schedule``, once
        across every supervisor that shares this broker: True when this call enqueued it, False
        when another had. SQL brokers: a unique row per (schedule, tick) in the enqueue's own
        transaction."""
        raise ConfigError(f"{self.url} keeps no schedule ticks")

    async def last_tick(self, schedule: str) -> float | None:
        """The latest tick of ``schedule`` enqueued so far (epoch seconds), None if none."""
        raise ConfigError(f"{self.url} keeps no schedule ticks")

    async def publish_in(self, connection: object, queue: str, messages: Sequence[Message]) -> None:
        """Enqueue ``messages`` inside the caller's open transaction on ``connection`` (an
        asyncpg connection): they exist only if that transaction commits."""
        raise ConfigError(
            f"send(..., connection=...) enqueues in the caller's transaction, which needs the "
            f"PostgreSQL broker (postgresql://); {self.url} is not it: drop connection="
        )

    def publish_in_sync(self, connection: object, queue: str, messages: Sequence[Message]) -> None:
        """``publish_in`` for code without an event loop, on a psycopg (3) connection."""
        raise ConfigError(
            f"send(..., connection=...) enqueues in the caller's transaction, which needs the "
            f"PostgreSQL broker (postgresql://); {self.url} is not it: drop connection="
        )

    # -- operating: dead letters and purges (``fastq dlq``, ``fastq purge``); any thread ------

    #: how ``fastq dlq`` names one dead letter: "id" (``DeadLetter.id``, a row number) or
    #: "message_id" (RabbitMQ, which numbers nothing)
    dead_letter_key = "id"

    def _cannot(self, what: str) -> ConfigError:
        return ConfigError(
            f"{self.url} cannot {what}; the memory://, sqlite://, postgresql:// and amqp:// "
            "brokers can"
        )

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead letters (of ``queue``, or of every queue), oldest first, with their reasons."""
        raise self._cannot("list dead letters")

    def dead_letter(self, id: int | str, *, queues: Sequence[str] = ()) -> DeadLetter | None:
        """The dead letter ``id`` names (see ``dead_letter_key``), None when there is none;
        ``queues``: where to look, for a broker without one table of them (RabbitMQ)."""
        raise self._cannot("show a dead letter")

    def requeue_dead_letters(
        self, ids: Sequence[Any] | None = None, *, queue: str | None = None
    ) -> int:
        """Put dead letters (all, those of ``queue``, or those ``ids``) back, with fresh counts;
        how many went back."""
        raise self._cannot("requeue dead letters")

    def purge(self, queue: str) -> int:
        """Delete the ready messages of ``queue`` (never one a consumer holds, nor a delayed
        one); how many went."""
        raise self._cannot("purge a queue")

    def purge_dead_letters(self, queue: str) -> int:
        """Delete the dead letters of ``queue``; how many went."""
        raise self._cannot("purge dead letters")

    @abc.abstractmethod
    async def queue_depth(self, queue: str) -> QueueDepth:
        """How many messages are ready, unacked and delayed."""

    def buffered(self, queue: str) -> int:
        """Deliveries of ``queue`` this process received and has not handed on yet (RabbitMQ
        pushes up to the qos ahead): waiting work that ``queue_depth`` counts as unacked, not
        as ready. 0 where a fetch claims exactly what it asks for."""
        return 0

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; unsettled deliveries come back to some consumer later."""


class ExchangeBroker(Broker):
    """A broker whose ``exchange`` does it all in one round trip (SQLite, PostgreSQL): ``fetch``
    and ``settle`` are its two halves, and it overrides ``exchange``."""

    async def fetch(
        self,
        queue: str,
        max_messages: int,
        *,
        timeout: float,
        wake: asyncio.Event | Signal | None = None,
    ) -> list[Delivery]:
        return await self.exchange(queue, fetch=max_messages, timeout=timeout, wake=wake)

    async def settle(
        self,
        queue: str,
        *,
        ack: Sequence[int] = (),
        retry: Sequence[Retry] = (),
        dead: Sequence[tuple[int, str]] = (),
        release: Sequence[int] = (),
    ) -> None:
        await self.exchange(queue, ack=ack, retry=retry, dead=dead, release=release)


def query_float(
    url: str, params: dict[str, list[str]], name: str, default: float, minimum: float
) -> float:
    """A number from a broker URL's query, checked; ConfigError names the URL (masked)."""
    if name not in params:
        return default
    raw = params[name][-1]
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= minimum:
        raise ConfigError(f"{name}={raw!r} in {mask_url(url)} must be a number >= {minimum}")
    return value
