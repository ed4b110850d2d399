"""``amqp://`` and ``amqps://``: RabbitMQ through aiormq (the only module that imports it).

One connection per supervisor. Each queue has one consumer on its own channel, whose
``basic.qos`` is the host's prefetch for that queue (``Broker.prefetch``); RabbitMQ pushes
deliveries into a local buffer that ``fetch`` takes from. Publishing goes through one channel in
confirm mode: ``publish`` returns when RabbitMQ confirmed every message (a bounded window of
them in flight at once); messages are persistent (delivery_mode 2) on durable queues.

Settling, on the delivery's own channel: acks go as one ``basic.ack`` with ``multiple`` over the
completed prefix of delivery tags (``fastq.ring.AckWindow``); completed tags past a gap
("stragglers") are acked one by one once ``STRAGGLERS`` of them wait or ``STRAGGLER_SECONDS``
passed. A retry is published, confirmed, to ``<queue>.retry.<ms>``, a durable queue whose
message TTL dead-letters it back to ``<queue>`` (one such queue per delay, rounded to two
significant digits, so a long delay never blocks a short one), with the retry count in the
``x-fastq-retries`` header; then the original is acked. A dead letter is published, confirmed,
to ``<queue>.dlq`` with ``x-fastq-reason``, ``x-fastq-exception`` and ``x-fastq-attempts``
headers, then acked. A release is a ``basic.nack`` with requeue.

When the connection drops, deliveries not yet settled are RabbitMQ's again: it redelivers them
(at-least-once: a handler may run twice). The broker reconnects with exponential backoff and
jitter, declares again and consumes again; settling a delivery of the lost connection is a no-op.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import aiormq
import aiormq.abc
from pamqp.commands import Basic

from fastq.broker.base import (
    Broker,
    Delivery,
    Message,
    QueueDepth,
    QueueOptions,
    Retry,
    Signal,
    mask_url,
    query_float,
    wait_either,
)
from fastq.errors import BrokerConnectionError, ConfigError
from fastq.ring import AckWindow

logger = logging.getLogger(__name__)

#: what a lost connection or a closed channel raises: the operation is tried again once connected
_CONNECTION_ERRORS = (aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError,
                      ConnectionError)

#: completed tags past a gap acked one by one once this many wait, or once the oldest waited this long
STRAGGLERS = 256
STRAGGLER_SECONDS = 0.05
#: publishes awaiting their confirm at once, per channel
CONFIRM_WINDOW = 512
#: a consumer that got nothing this long while its queue had messages and it had room is rebuilt
WATCHDOG_SECONDS = 10.0
#: the consumer's prefetch until the supervisor says (Broker.prefetch)
DEFAULT_PREFETCH = 100
RECONNECT_MIN, RECONNECT_MAX = 0.2, 15.0
#: how often the watcher looks at the connection
WATCH_SECONDS = 0.25
#: a publish waits this long for a connection, or for its confirm, before it raises BrokerConnectionError
PUBLISH_TIMEOUT = 60.0
#: a retry queue unused this long (no declare; at least twice its TTL) is deleted by RabbitMQ
RETRY_EXPIRES_MS = 3_600_000
HEADER_RETRIES = "x-fastq-retries"
HEADER_REASON = "x-fastq-reason"
HEADER_EXCEPTION = "x-fastq-exception"
HEADER_ATTEMPTS = "x-fastq-attempts"
#: the content type of a fastq envelope; raw messages of consumers keep theirs
MSGPACK = "application/msgpack"
#: our own options in the URL's query; the rest is aiormq's (TLS files, heartbeat, ...)
OWN_OPTIONS = ("confirm_window", "publish_timeout", "management_port")


def retry_queue(queue: str, delay: float) -> tuple[str, int]:
    """The TTL queue for ``delay`` seconds (two significant digits of milliseconds, >= 1)."""
    ms = max(1, round(delay * 1000))
    digits = len(str(ms))
    if digits > 2:
        step = 10 ** (digits - 2)
        ms = round(ms / step) * step
    return f"{queue}.retry.{ms}", ms


def _exception_type(reason: str) -> str:
    """``ValueError`` of ``"ValueError: bad input"``; empty when the reason names none."""
    head = reason.partition(":")[0].strip()
    return head if head.replace(".", "").replace("_", "").isalnum() and " " not in head else ""


class _Consumer:
    """One queue's consumer: its channel, its tag, its deliveries not taken yet, its acks."""

    def __init__(self, queue: str, channel: aiormq.abc.AbstractChannel, prefetch: int, generation: int) -> None:
        self.queue, self.channel, self.prefetch, self.generation = queue, channel, prefetch, generation
        self.tag = ""
        self.buffer: collections.deque[aiormq.abc.DeliveredMessage] = collections.deque()
        self.window = AckWindow(1)
        self.straggling_since = 0.0
        self.arrived = Signal()
        self.alive = True
        self.callback: Any = None
        self.last_arrival = self.last_check = time.monotonic()


class _Held:
    """A delivery handed to the supervisor and not settled yet."""

    __slots__ = ("consumer", "copied", "delivery_tag", "message")

    def __init__(self, consumer: _Consumer, message: aiormq.abc.DeliveredMessage) -> None:
        self.consumer, self.delivery_tag, self.message = consumer, message.delivery.delivery_tag, message  # type: ignore[union-attr]
        #: its retry or dead-letter copy is confirmed: a settle sent again does not copy it twice
        self.copied = False


class AMQPBroker(Broker):
    """See the module docstring. Every coroutine runs on the loop that opened it;
    ``publish_sync`` runs its own connection on a thread of its own."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("amqp", "amqps"):
            raise ConfigError(f"not an AMQP URL: {mask_url(url)!r}; expected amqp://user:pass@host:port/vhost")
        if not parts.hostname:
            raise ConfigError(f"AMQP URL {mask_url(url)!r} names no host")
        params = urllib.parse.parse_qs(parts.query)
        self.confirm_window = int(query_float(url, params, "confirm_window", CONFIRM_WINDOW, 1))
        self.publish_timeout = query_float(url, params, "publish_timeout", PUBLISH_TIMEOUT, 0.1)
        self.management_port = int(query_float(url, params, "management_port", 15672, 1))
        self.management_port_given = "management_port" in params
        query = urllib.parse.urlencode([(k, v) for k, vs in params.items() if k not in OWN_OPTIONS for v in vs])
        self._url = urllib.parse.urlunsplit(parts._replace(query=query))
        self._given_url = url
        self.url = mask_url(url)
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._publisher: aiormq.abc.AbstractChannel | None = None
        self._window: asyncio.Semaphore | None = None
        self._declared: set[str] = set()  # queues and dead-letter queues
        self._retry_declared: dict[str, float] = {}  # retry queue -> when it was last declared
        self._queues: list[str] = []  # declared by the caller, declared again after a reconnect
        self._prefetch: dict[str, int] = {}
        self._routes: dict[str, QueueOptions] = {}
        self._consumers: dict[str, _Consumer] = {}
        self._held: dict[int, _Held] = {}
        self._tags = itertools.count(1)
        self._generation = 0
        self._connected = asyncio.Event()
        self._closing = False
        self._watcher: asyncio.Task[None] | None = None
        self._sync: _SyncPublisher | None = None
        self._sync_lock = threading.Lock()

    # -- connection ----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._connection is not None:
            return
        self._closing = False
        await self._connect(first=True)
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _connect(self, *, first: bool = False) -> None:
        """Connect, open the publishing channel, declare and consume again; until it works
        (the first time: raise BrokerConnectionError instead)."""
        delay = RECONNECT_MIN
        while True:
            connection: aiormq.abc.AbstractConnection | None = None
            try:
                connection = await aiormq.connect(self._url)
                self._connection = connection
                self._generation += 1
                self._publisher = await connection.channel(publisher_confirms=True)
                self._window = asyncio.Semaphore(self.confirm_window)
                self._declared.clear()
                self._retry_declared.clear()
                for queue in self._queues:
                    await self._declare(queue)
                for queue, prefetch in list(self._prefetch.items()):
                    await self._consume(queue, prefetch)
                break
            except Exception as e:  # noqa: BLE001 - whatever failed, this attempt is over
                text = f"{type(e).__name__}: {self._scrub(str(e))}"
                self._lost()
                self._connection = None
                if connection is not None:
                    try:
                        await connection.close()
                    except Exception:  # noqa: BLE001, S110 - it is broken already
                        pass
                if first:
                    raise BrokerConnectionError(f"cannot connect to RabbitMQ at {self.url}: {text}") from None
                logger.warning("RabbitMQ at %s unreachable (%s); trying again in %.1f s", self.url, text, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, RECONNECT_MAX)
        self._connected.set()
        if not first:
            logger.warning("reconnected to RabbitMQ at %s; consuming %s again", self.url, sorted(self._prefetch))

    def _scrub(self, text: str) -> str:
        """``text`` without the URL's password, wherever a library put it."""
        password = urllib.parse.urlsplit(self._url).password
        text = text.replace(self._url, self.url)
        return text.replace(password, "***") if password else text

    async def _watch(self) -> None:
        """Reconnect whenever the connection closes, until ``close``. It looks every
        ``WATCH_SECONDS`` rather than awaiting ``connection.closing``, which aiormq may cancel
        while the connection lives on (seen when a channel is closed)."""
        while not self._closing:
            connection = self._connection
            if connection is not None and not connection.is_closed:
                await asyncio.sleep(WATCH_SECONDS)
                continue
            if self._closing:
                return
            logger.warning("connection to RabbitMQ at %s lost; its unsettled deliveries go back to RabbitMQ",
                           self.url)
            self._lost()
            try:
                await self._connect()
            except Exception:
                logger.exception("reconnecting to RabbitMQ at %s failed; trying again", self.url)
                await asyncio.sleep(RECONNECT_MAX)

    def _lost(self) -> None:
        """Forget the dead connection's consumers and deliveries: RabbitMQ requeued them."""
        self._connected.clear()
        for consumer in self._consumers.values():
            consumer.alive = False
            consumer.buffer.clear()
            consumer.arrived.set()
        self._consumers.clear()
        self._held.clear()

    async def _ready(self) -> aiormq.abc.AbstractChannel:
        if not self._connected.is_set():
            try:
                await asyncio.wait_for(self._connected.wait(), self.publish_timeout)
            except TimeoutError:
                raise BrokerConnectionError(f"no connection to RabbitMQ at {self.url} for "
                                            f"{self.publish_timeout:g} s") from None
        assert self._publisher is not None and self._connection is not None
        if self._publisher.is_closed and not self._connection.is_closed:
            # RabbitMQ closed the channel alone (a channel error): the connection goes on
            logger.warning("RabbitMQ closed the publishing channel on %s; opening another", self.url)
            self._publisher = await self._connection.channel(publisher_confirms=True)
            self._window = asyncio.Semaphore(self.confirm_window)
        return self._publisher

    # -- topology ------------------------------------------------------------------------------

    async def declare(self, queue: str) -> None:
        if queue not in self._queues:
            self._queues.append(queue)
        await self._ready()
        await self._declare(queue)

    def configure(self, queue: str, options: QueueOptions) -> None:
        self._routes[queue] = options
        self._declared.discard(queue)

    async def _declare(self, queue: str) -> None:
        """The queue (its type and arguments), its dead-letter queue, its exchange and binding."""
        assert self._publisher is not None
        if queue in self._declared:
            return
        route = self._routes.get(queue, QueueOptions())
        channel = self._publisher
        try:
            await channel.queue_declare(queue, durable=True, arguments=route.arguments() or None)
            await channel.queue_declare(f"{queue}.dlq", durable=True)
            if route.exchange:
                await channel.exchange_declare(route.exchange, exchange_type=route.exchange_kind, durable=True)
                await channel.queue_bind(queue, route.exchange, routing_key=route.routing_key or queue,
                                         arguments=dict(route.binding_arguments or {}) or None)
        except aiormq.exceptions.ChannelPreconditionFailed as e:
            # RabbitMQ closed the channel: open another, and say what to change
            assert self._connection is not None
            self._publisher = await self._connection.channel(publisher_confirms=True)
            raise ConfigError(f"RabbitMQ refused to declare {queue!r} as {route} ({self._scrub(str(e))}): "
                              f"it exists with other settings; delete it, or declare it as it is") from None
        self._declared.update((queue, f"{queue}.dlq"))

    async def _declare_retry(self, channel: aiormq.abc.AbstractChannel, queue: str, delay: float) -> str:
        """The TTL queue for ``delay``. It expires when unused for ``RETRY_EXPIRES`` (or twice its
        TTL): a declare counts as a use, and RabbitMQ counts from the last one, not from the
        last publish, so it is declared again whenever a quarter of that time passed."""
        name, ms = retry_queue(queue, delay)
        expires = max(RETRY_EXPIRES_MS, 2 * ms + 60_000)
        now = time.monotonic()
        if now - self._retry_declared.get(name, -1e18) > expires / 4000:
            await channel.queue_declare(name, durable=True, arguments={
                "x-message-ttl": ms, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": queue,
                "x-expires": expires})
            self._retry_declared[name] = now
        return name

    # -- publishing ----------------------------------------------------------------------------

    async def publish(self, queue: str, messages: Sequence[Message]) -> None:
        """Publish and wait for RabbitMQ's confirm of each; a connection lost meanwhile publishes
        the unconfirmed ones again once it is back (so a message may arrive twice, never not)."""
        pending, attempts = list(messages), 0
        while pending:
            channel = await self._ready()
            try:
                await self._declare(queue)
                results = await asyncio.gather(*[self._publish_one(channel, queue, m) for m in pending],
                                               return_exceptions=True)
            except _CONNECTION_ERRORS as e:
                logger.warning("publishing to %r on %s failed (%s); waiting for the connection", queue, self.url,
                               type(e).__name__)
                await self._wait_reconnect()
                continue
            failed = [m for m, r in zip(pending, results) if isinstance(r, BaseException)]
            hard = [r for r in results if isinstance(r, BaseException) and not _transient(r)]
            if hard:
                raise BrokerConnectionError(f"RabbitMQ at {self.url} refused a publish to {queue!r}: "
                                            f"{self._scrub(str(hard[0]))}") from None
            attempts += 1
            if failed and attempts > 20:
                raise BrokerConnectionError(f"publishing {len(failed)} messages to {queue!r} on {self.url} failed "
                                            f"20 times: {results[0]!r}")
            if failed and not all(isinstance(r, _Unroutable) for r in results if isinstance(r, BaseException)):
                await self._wait_reconnect()
            pending = failed

    async def _wait_reconnect(self) -> None:
        """Give the watcher time to notice a dead connection, then wait for the new one."""
        deadline = time.monotonic() + self.publish_timeout
        while (self._connection is not None and not self._connection.is_closed and self._connected.is_set()
               and self._publisher is not None and not self._publisher.is_closed):
            if time.monotonic() > deadline:
                raise BrokerConnectionError(f"publishing to RabbitMQ at {self.url} failed for {self.publish_timeout:g} s")
            await asyncio.sleep(0.05)
        await self._ready()

    async def _publish_one(self, channel: aiormq.abc.AbstractChannel, queue: str, m: Message) -> None:
        exchange = ""
        headers: dict[str, Any] = dict(m.headers or {})
        route = self._routes.get(queue)
        routing_key = queue
        if m.delay > 0:  # through the TTL queue, which dead-letters straight into the queue
            routing_key = await self._declare_retry(channel, queue, m.delay)
        elif route is not None and route.exchange:
            exchange, routing_key = route.exchange, route.routing_key or queue
            for k, v in (route.binding_arguments or {}).items():
                if not k.startswith("x-"):
                    headers.setdefault(k, v)
        properties = Basic.Properties(delivery_mode=2, message_id=m.message_id or None,
                                      content_type=headers.pop("content-type", MSGPACK), headers=headers or None)
        await self._confirmed(channel, queue, m.body, properties, exchange, routing_key)

    async def _confirmed(self, channel: aiormq.abc.AbstractChannel, queue: str, body: bytes,
                         properties: Basic.Properties, exchange: str, routing_key: str) -> None:
        """Publish one message (mandatory, persistent) within the confirm window and wait for
        RabbitMQ's confirm. A return (no queue took it: ``queue``'s topology was deleted
        meanwhile?) forgets that ``queue`` was declared, so that the next try declares it again."""
        assert self._window is not None
        async with self._window:
            try:
                confirm = await channel.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                                      properties=properties, mandatory=True,
                                                      timeout=self.publish_timeout)
            except aiormq.exceptions.PublishError:
                self._declared.discard(queue)
                self._retry_declared.pop(routing_key, None)
                raise _Unroutable(f"no queue took message {properties.message_id!r} for {routing_key!r}") from None
        if not isinstance(confirm, Basic.Ack):
            raise _Nacked(f"RabbitMQ did not confirm message {properties.message_id!r} to {routing_key!r}: {confirm!r}")

    def publish_sync(self, queue: str, messages: Sequence[Message]) -> None:
        with self._sync_lock:
            if self._sync is None:
                self._sync = _SyncPublisher(self._given_url, self._routes)
        self._sync.publish(queue, messages)

    # -- consuming -----------------------------------------------------------------------------

    async def prefetch(self, queue: str, prefetch: int) -> None:
        """Consume ``queue`` with ``basic.qos`` = ``prefetch`` (the host's budget). A change
        reaches a running consumer by a new one: ``basic.qos`` applies only to consumers made
        after it. On the same channel (its delivery tags and acks go on), the new consumer
        starts, then the old one is cancelled; what RabbitMQ sent the old one before its
        cancel-ok still arrives here, in order: nothing lost, nothing twice."""
        self._prefetch[queue] = prefetch
        consumer = self._consumers.get(queue)
        if consumer is None:
            if self._connected.is_set():
                await self._consume(queue, prefetch)
            return
        if prefetch == consumer.prefetch or not consumer.alive:
            return
        try:
            await consumer.channel.basic_qos(prefetch_count=prefetch)
            ok = await consumer.channel.basic_consume(queue, consumer.callback)
            old, consumer.tag, consumer.prefetch = consumer.tag, ok.consumer_tag, prefetch
            await consumer.channel.basic_cancel(old)
            logger.info("consuming %r with prefetch %d (a new consumer; the old one cancelled)", queue, prefetch)
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as e:
            logger.warning("changing the prefetch of %r failed (%s); rebuilding its consumer", queue, type(e).__name__)
            await self._rebuild(consumer)

    async def _consume(self, queue: str, prefetch: int) -> None:
        connection, generation = self._connection, self._generation
        assert connection is not None
        await self._declare(queue)
        channel = await connection.channel(publisher_confirms=False)
        await channel.basic_qos(prefetch_count=prefetch)
        consumer = _Consumer(queue, channel, prefetch, generation)

        async def arrived(message: aiormq.abc.DeliveredMessage) -> None:
            if consumer.alive:
                consumer.buffer.append(message)
                consumer.last_arrival = time.monotonic()
                consumer.arrived.set()

        consumer.callback = arrived
        ok = await channel.basic_consume(queue, arrived)
        consumer.tag = ok.consumer_tag
        if generation != self._generation or queue in self._consumers:  # reconnected meanwhile
            consumer.alive = False
            await channel.close()
            return
        self._consumers[queue] = consumer

    async def _rebuild(self, consumer: _Consumer) -> None:
        """Replace a consumer whose channel RabbitMQ closed or whose consumer it cancelled, or
        that gets nothing while its queue has messages: a new channel, a new consumer. What
        the old channel held is RabbitMQ's again (redelivered: at-least-once)."""
        consumer.alive = False
        consumer.buffer.clear()
        consumer.arrived.set()
        if self._consumers.get(consumer.queue) is consumer:
            del self._consumers[consumer.queue]
        for tag in [t for t, h in self._held.items() if h.consumer is consumer]:
            del self._held[tag]
        if not consumer.channel.is_closed:
            try:
                await consumer.channel.close()
            except Exception:  # noqa: BLE001, S110 - it goes either way
                pass
        if self._connected.is_set() and not self._closing:
            await self._consume(consumer.queue, self._prefetch.get(consumer.queue, consumer.prefetch))

    async def _check(self, consumer: _Consumer, wanted: int) -> _Consumer | None:
        """The watchdog: a consumer whose channel closed or whose consumer was cancelled is
        rebuilt at once; one that got nothing for ``WATCHDOG_SECONDS`` while the supervisor
        had room, its queue had ready messages and it held less than its prefetch, too."""
        broken = consumer.channel.is_closed or consumer.tag not in consumer.channel.consumers
        if not broken and wanted > 0 and not consumer.buffer:
            now = time.monotonic()
            if now - max(consumer.last_arrival, consumer.last_check) >= WATCHDOG_SECONDS:
                consumer.last_check = now
                held = sum(1 for h in self._held.values() if h.consumer is consumer)
                if held < consumer.prefetch and (await self._passive(consumer.queue)).message_count:
                    logger.warning("the consumer of %r got nothing for %.0f s while messages wait; rebuilding it",
                                   consumer.queue, now - consumer.last_arrival)
                    broken = True
        if broken:
            if consumer.alive:
                logger.warning("the consumer of %r is gone (channel closed or consumer cancelled); consuming again",
                               consumer.queue)
            await self._rebuild(consumer)
            return self._consumers.get(consumer.queue)
        return consumer

    async def _passive(self, queue: str) -> Any:
        """``queue.declare`` passive on a channel of its own: a missing queue closes that one."""
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=False)
        try:
            return await channel.queue_declare(queue, passive=True)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def fetch(self, queue: str, max_messages: int, *, timeout: float,
                    wake: asyncio.Event | Signal | None = None) -> list[Delivery]:
        consumer = self._consumers.get(queue)
        if consumer is None:
            if queue not in self._prefetch:
                await self.prefetch(queue, DEFAULT_PREFETCH)
            consumer = self._consumers.get(queue)
        if consumer is not None:
            consumer = await self._check(consumer, max_messages)
        if consumer is None:  # not connected: wait a little, as an empty queue would
            await wait_either(self._connected, wake, min(timeout, 1.0))
            return []
        if not consumer.buffer and timeout > 0:
            consumer.arrived.clear()
            await wait_either(consumer.arrived, wake, timeout)
        out: list[Delivery] = []
        while consumer.buffer and len(out) < max_messages:
            out.append(self._delivery(consumer, consumer.buffer.popleft()))
        await self._flush_stragglers(consumer, force=False)
        return out

    def _delivery(self, consumer: _Consumer, message: aiormq.abc.DeliveredMessage) -> Delivery:
        tag = next(self._tags)
        self._held[tag] = _Held(consumer, message)
        props = message.header.properties
        headers = props.headers or {}
        try:
            retries = int(headers.get(HEADER_RETRIES, 0))
        except (TypeError, ValueError):
            retries = 0
        count = headers.get("x-delivery-count")  # quorum queues count every delivery before this one
        redelivered = count if isinstance(count, int) else (1 if message.delivery.redelivered else 0)  # type: ignore[union-attr]
        return Delivery(tag=tag, queue=consumer.queue, body=message.body, message_id=props.message_id or "",
                        attempts=retries + 1 + redelivered, retries=retries,
                        headers={str(k): str(v) for k, v in headers.items()
                                 if isinstance(v, (str, int, float, bool))} or None)

    # -- settling ------------------------------------------------------------------------------

    async def settle(self, queue: str, *, ack: Sequence[int] = (), retry: Sequence[Retry] = (),
                     dead: Sequence[tuple[int, str]] = (), release: Sequence[int] = ()) -> None:
        copies = [self._retry_copy(r) for r in retry] + [self._dead_copy(t, reason) for t, reason in dead]
        copies = [c for c in copies if c is not None]
        if copies:  # published and confirmed before the originals are acked
            channel = await self._ready()
            await self._declare(queue)  # again, if a returned copy found its topology gone
            await asyncio.gather(*[self._republish(channel, *c) for c in copies])
        done = list(ack) + [r.tag for r in retry] + [t for t, _ in dead]
        by_consumer: dict[int, tuple[_Consumer, list[int], list[int]]] = {}
        for tags, requeue in ((done, False), (release, True)):
            for tag in tags:
                held = self._held.pop(tag, None)
                if held is None or not held.consumer.alive:  # settled already, or its connection is gone
                    continue
                entry = by_consumer.setdefault(id(held.consumer), (held.consumer, [], []))
                entry[2 if requeue else 1].append(held.delivery_tag)
        for consumer, acks, releases in by_consumer.values():
            await self._settle_on(consumer, acks, releases)

    async def _settle_on(self, consumer: _Consumer, acks: list[int], releases: list[int]) -> None:
        window, channel = consumer.window, consumer.channel
        try:
            if acks:
                window.done(acks)
                last = window.ack_prefix()
                if last:
                    await channel.basic_ack(last, multiple=True)
            if releases:
                window.done(releases)
                requeue = set(releases)
                for tag in window.take_stragglers():  # the releases, and what waited past a gap
                    if tag in requeue:
                        await channel.basic_nack(tag, multiple=False, requeue=True)
                    else:
                        await channel.basic_ack(tag, multiple=False)
                last = window.ack_prefix()  # a release may have closed a gap
                if last:
                    await channel.basic_ack(last, multiple=True)
            await self._flush_stragglers(consumer, force=False)
        except _CONNECTION_ERRORS as e:
            # the connection went: RabbitMQ requeues what this channel held, settled or not
            logger.warning("settling on %r failed (%s); RabbitMQ redelivers what was not acked",
                           consumer.queue, type(e).__name__)

    async def _flush_stragglers(self, consumer: _Consumer, *, force: bool) -> None:
        waiting = consumer.window.waiting()
        if not waiting:
            consumer.straggling_since = 0.0
            return
        now = time.monotonic()
        if not consumer.straggling_since:
            consumer.straggling_since = now
        if force or waiting >= STRAGGLERS or now - consumer.straggling_since >= STRAGGLER_SECONDS:
            for tag in consumer.window.take_stragglers():
                await consumer.channel.basic_ack(tag, multiple=False)
            consumer.straggling_since = 0.0

    def _copy_of(self, tag: int) -> tuple[_Held, dict[str, Any]] | None:
        """The held delivery to copy (retry, dead letter) and its headers; None when it is
        settled, its connection is gone, or its copy is confirmed already."""
        held = self._held.get(tag)
        if held is None or not held.consumer.alive or held.copied:
            return None
        return held, dict(held.message.header.properties.headers or {})

    def _retry_copy(self, r: Retry) -> tuple[Any, ...] | None:
        found = self._copy_of(r.tag)
        if found is None:
            return None
        held, headers = found
        headers[HEADER_RETRIES] = int(headers.get(HEADER_RETRIES, 0) or 0) + 1
        headers[HEADER_REASON] = r.reason[:1000]
        return held, held.consumer.queue, max(r.delay, 0.001), headers

    def _dead_copy(self, tag: int, reason: str) -> tuple[Any, ...] | None:
        found = self._copy_of(tag)
        if found is None:
            return None
        held, headers = found
        retries = int(headers.get(HEADER_RETRIES, 0) or 0)
        headers.update({HEADER_REASON: reason[:1000], HEADER_EXCEPTION: _exception_type(reason),
                        HEADER_ATTEMPTS: retries + 1})
        return held, f"{held.consumer.queue}.dlq", 0.0, headers

    async def _republish(self, channel: aiormq.abc.AbstractChannel, held: _Held, target: str, delay: float,
                         headers: dict[str, Any]) -> None:
        props = held.message.header.properties
        routing_key = target
        if delay > 0:
            routing_key = await self._declare_retry(channel, target, delay)
        properties = Basic.Properties(delivery_mode=2, message_id=props.message_id,
                                      content_type=props.content_type, headers=headers)
        await self._confirmed(channel, held.consumer.queue, held.message.body, properties, "", routing_key)
        held.copied = True

    # -- the rest ------------------------------------------------------------------------------

    async def queue_depth(self, queue: str) -> QueueDepth:
        """Ready and consumers from ``queue.declare`` (passive); dead letters from the dlq's;
        unacked of every host from RabbitMQ's management API when it answers (port
        ``management_port``, default 15672, same credentials), else this process's own."""
        await self._ready()
        ok = await self._passive(queue)
        dead = await self._passive(f"{queue}.dlq") if f"{queue}.dlq" in self._declared else None
        unacked = await asyncio.get_running_loop().run_in_executor(None, self._unacked_everywhere, queue)
        if unacked is None:
            consumer = self._consumers.get(queue)
            held = sum(1 for h in self._held.values() if h.consumer.queue == queue)
            return QueueDepth(ready=ok.message_count or 0, unacked=held + (len(consumer.buffer) if consumer else 0),
                              dead=(dead.message_count or 0) if dead else 0, consumers=ok.consumer_count,
                              unacked_scope="this process")
        return QueueDepth(ready=ok.message_count or 0, unacked=unacked, consumers=ok.consumer_count,
                          dead=(dead.message_count or 0) if dead else 0)

    def _unacked_everywhere(self, queue: str) -> int | None:
        import base64
        import json
        import urllib.request

        parts = urllib.parse.urlsplit(self._url)
        if parts.scheme.lower() == "amqps" and not self.management_port_given:
            return None  # credentials go over plain HTTP only where AMQP itself was plain, or when asked
        vhost = urllib.parse.quote(urllib.parse.unquote(parts.path[1:]) or "/", safe="")
        api = f"http://{parts.hostname}:{self.management_port}/api/queues/{vhost}/{urllib.parse.quote(queue, safe='')}"
        user = urllib.parse.unquote(parts.username or "guest")
        password = urllib.parse.unquote(parts.password or "guest")
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        request = urllib.request.Request(api, headers={"Authorization": f"Basic {auth}"})
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return int(json.load(response).get("messages_unacknowledged", 0))
        except (OSError, ValueError):  # not enabled, not reachable: the caller says whose count it is
            return None

    async def close(self) -> None:
        self._closing = True
        for consumer in list(self._consumers.values()):
            try:
                await self._flush_stragglers(consumer, force=True)
            except Exception:  # noqa: BLE001 - closing anyway; RabbitMQ redelivers what was not acked
                pass
        self._lost()
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
        if self._sync is not None:
            self._sync.close()
            self._sync = None


class _Nacked(Exception):
    """RabbitMQ answered a publish with basic.nack."""


class _Unroutable(Exception):
    """RabbitMQ returned a mandatory publish: declared again, it is published again."""


def _transient(e: BaseException) -> bool:
    return isinstance(e, (*_CONNECTION_ERRORS, asyncio.CancelledError, TimeoutError, _Unroutable))


class _SyncPublisher:
    """``publish_sync``: a connection of its own on a thread of its own, for code without a
    loop; opened once, shared by every thread that publishes."""

    def __init__(self, url: str, routes: dict[str, QueueOptions]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fastq-amqp-publish", daemon=True)
        self.thread.start()
        self.broker = AMQPBroker(url)
        self.broker._routes = routes  # the app's exchanges and routing keys: the same dict
        self.timeout = self.broker.publish_timeout * 2 + 10
        try:
            asyncio.run_coroutine_threadsafe(self.broker.open(), self.loop).result(self.timeout)
        except BaseException:
            self.close()
            raise

    def publish(self, queue: str, messages: Sequence[Message]) -> None:
        future = asyncio.run_coroutine_threadsafe(self.broker.publish(queue, messages), self.loop)
        try:
            future.result(self.timeout)
        except TimeoutError:
            future.cancel()
            raise BrokerConnectionError(f"publishing to {queue!r} on {self.broker.url} took over "
                                        f"{self.timeout:g} s") from None

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.broker.close(), self.loop).result(10)
        except Exception:  # noqa: BLE001, S110 - closing anyway
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()
