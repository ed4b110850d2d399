"""Each queue's one consumer on its own channel of the consuming connection
(fastq.broker.amqp.stream), whose ``basic.qos`` is the host's prefetch for that queue: RabbitMQ
pushes deliveries into a local buffer that ``fetch`` takes from, a read's worth at a time. A
prefetch change makes a new consumer on the same channel (``basic.qos`` reaches only consumers
made after it); a consumer whose channel closed, that was cancelled, or that gets nothing while
its queue has messages (the watchdog) is rebuilt.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

import aiormq

from fastq.broker.amqp.channel import ACK_SECONDS, StreamChannel
from fastq.broker.amqp.connection import Connection
from fastq.broker.base import Delivery, Signal, wait_either
from fastq.ring import AckWindow

if TYPE_CHECKING:
    from fastq.broker.amqp.stream import Delivered

logger = logging.getLogger(__name__)

#: completed tags past a gap are acked one by one once this many wait, or once the oldest waited
#: this long (seconds)
STRAGGLERS = 256
STRAGGLER_SECONDS = 0.05
#: a consumer that got nothing this long while its queue had messages and it had room is rebuilt
WATCHDOG_SECONDS = 10.0
#: the consumer's prefetch until the supervisor says (Broker.prefetch)
DEFAULT_PREFETCH = 100
HEADER_RETRIES = "x-fastq-retries"


class Consumer:
    """One queue's consumer: its channel, its tag, its deliveries not taken yet, its acks."""

    def __init__(self, queue: str, channel: StreamChannel, prefetch: int, generation: int) -> None:
        self.queue, self.channel, self.prefetch, self.generation = (
            queue,
            channel,
            prefetch,
            generation,
        )
        self.tag = ""
        self.buffer: collections.deque[Delivered] = collections.deque()
        #: the channel's delivery tags completed, and the acks they allow (basic.ack multiple)
        self.window = AckWindow(1)
        self.straggling_since = 0.0
        self.arrived = Signal()
        self.alive = True
        self.callback: Any = None
        #: a prefetch change was not made (single active consumer): said once
        self.kept_prefetch = False
        self.last_arrival = self.last_check = time.monotonic()
        channel.ack_seconds = ACK_SECONDS
        self.coalesce(prefetch)

    def coalesce(self, prefetch: int) -> None:
        """Acks wait to go together (fastq.broker.amqp.channel) until they cover a third of
        the prefetch, or ACK_SECONDS: what waits for its ack is not work RabbitMQ can send, so
        two thirds of the prefetch stay in flight."""
        self.channel.ack_batch = max(1, prefetch // 3)

    def flush_stragglers(self, *, force: bool) -> None:
        """Ack one by one the completed tags past a gap, once STRAGGLERS of them wait or the
        oldest waited STRAGGLER_SECONDS (or now, with ``force``, with the held ack first)."""
        if force:
            self.channel.flush_acks()
        waiting = self.window.waiting()
        if not waiting:
            self.straggling_since = 0.0
            return
        now = time.monotonic()
        if not self.straggling_since:
            self.straggling_since = now
        if force or waiting >= STRAGGLERS or now - self.straggling_since >= STRAGGLER_SECONDS:
            for tag in self.window.take_stragglers():
                self.channel.basic_ack(tag, multiple=False)
            self.straggling_since = 0.0


class Held:
    """A delivery handed to the supervisor and not settled yet."""

    __slots__ = ("consumer", "copied", "delivery_tag", "message")

    def __init__(self, consumer: Consumer, message: Delivered) -> None:
        self.consumer, self.message = consumer, message
        self.delivery_tag: int = message[1]
        #: its retry or dead-letter copy is confirmed: a settle sent again does not copy it twice
        self.copied = False


class Consumers:
    """The consumers of one connection, and the deliveries handed on and not settled yet."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.by_queue: dict[str, Consumer] = {}
        #: by the tag the supervisor settles with (ours: unique across channels and reconnects)
        self.held: dict[int, Held] = {}
        self.tags = itertools.count(1)
        #: each queue's prefetch, consumed again after a reconnect
        self.prefetch_of: dict[str, int] = {}

    def lost(self) -> None:
        """Forget the dead connection's consumers and deliveries: RabbitMQ requeued them."""
        for consumer in self.by_queue.values():
            consumer.alive = False
            consumer.buffer.clear()
            consumer.arrived.set()
        self.by_queue.clear()
        self.held.clear()

    async def restore(self, first: bool) -> None:
        for queue, prefetch in list(self.prefetch_of.items()):
            await self.consume(queue, prefetch)
        if not first:
            logger.warning(
                "reconnected to RabbitMQ at %s; consuming %s again",
                self.connection.url,
                sorted(self.prefetch_of),
            )

    async def prefetch(self, queue: str, prefetch: int) -> None:
        """Consume ``queue`` with ``basic.qos`` = ``prefetch`` (the host's budget). A change
        reaches a running consumer by a new one: ``basic.qos`` applies only to consumers made
        after it. On the same channel (its delivery tags and acks go on), the new consumer
        starts, then the old one is cancelled; what RabbitMQ sent the old one before its
        cancel-ok still arrives here, in order: nothing lost, nothing twice. Not on a single
        active consumer queue: cancelling the active consumer would hand the queue to another
        host's; there the prefetch of the first consumer stays (the supervisor's budget still
        bounds what it holds), and a reconnect consumes with the newest."""
        self.prefetch_of[queue] = prefetch
        consumer = self.by_queue.get(queue)
        if consumer is None:
            if self.connection.connected.is_set():
                await self.consume(queue, prefetch)
            return
        if prefetch == consumer.prefetch or not consumer.alive:
            return
        route = self.connection.routes.get(queue)
        if route is not None and route.single_active_consumer:
            if not consumer.kept_prefetch:
                consumer.kept_prefetch = True
                logger.info(
                    "%r has a single active consumer: its prefetch stays %d at RabbitMQ (a new "
                    "consumer would hand the queue to another host)",
                    queue,
                    consumer.prefetch,
                )
            return
        try:
            await consumer.channel.basic_qos(prefetch_count=prefetch)
            tag = await consumer.channel.basic_consume(queue, consumer.callback)
            old, consumer.tag, consumer.prefetch = consumer.tag, tag, prefetch
            consumer.coalesce(prefetch)
            await consumer.channel.basic_cancel(old)
            logger.info(
                "consuming %r with prefetch %d (a new consumer; the old one cancelled)",
                queue,
                prefetch,
            )
        except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as e:
            logger.warning(
                "changing the prefetch of %r failed (%s); rebuilding its consumer",
                queue,
                type(e).__name__,
            )
            await self.rebuild(consumer)

    async def consume(self, queue: str, prefetch: int) -> None:
        conn = self.connection
        generation = conn.generation
        await conn.declare(queue)
        channel = await (await conn.consuming()).channel()
        await channel.basic_qos(prefetch_count=prefetch)
        consumer = Consumer(queue, channel, prefetch, generation)

        def arrived(messages: list[Delivered]) -> None:
            if consumer.alive:
                consumer.buffer.extend(messages)
                consumer.last_arrival = time.monotonic()
                consumer.arrived.set()

        consumer.callback = arrived
        consumer.tag = await channel.basic_consume(queue, arrived)
        if generation != conn.generation or queue in self.by_queue:  # reconnected meanwhile
            consumer.alive = False
            await channel.close()
            return
        self.by_queue[queue] = consumer

    async def rebuild(self, consumer: Consumer) -> None:
        """Replace a consumer whose channel RabbitMQ closed or whose consumer it cancelled, or
        that gets nothing while its queue has messages: a new channel, a new consumer. What
        the old channel held is RabbitMQ's again (redelivered: at-least-once)."""
        consumer.alive = False
        consumer.buffer.clear()
        consumer.arrived.set()
        if self.by_queue.get(consumer.queue) is consumer:
            del self.by_queue[consumer.queue]
        for tag in [t for t, h in self.held.items() if h.consumer is consumer]:
            del self.held[tag]
        if not consumer.channel.is_closed:
            try:
                await consumer.channel.close()
            except Exception:  # noqa: BLE001, S110 - it goes either way
                pass
        if self.connection.connected.is_set() and not self.connection.closing:
            await self.consume(
                consumer.queue, self.prefetch_of.get(consumer.queue, consumer.prefetch)
            )

    async def check(self, consumer: Consumer, wanted: int) -> Consumer | None:
        """The watchdog: a consumer whose channel closed or whose consumer was cancelled is
        rebuilt at once; one that got nothing for ``WATCHDOG_SECONDS`` while the supervisor
        had room, its queue had ready messages and it held less than its prefetch, too."""
        broken = consumer.channel.is_closed or consumer.tag not in consumer.channel.consumers
        if not broken and wanted > 0 and not consumer.buffer:
            now = time.monotonic()
            if now - max(consumer.last_arrival, consumer.last_check) >= WATCHDOG_SECONDS:
                consumer.last_check = now
                held = sum(1 for h in self.held.values() if h.consumer is consumer)
                if held < consumer.prefetch and (await self.passive(consumer.queue)).message_count:
                    logger.warning(
                        "the consumer of %r got nothing for %.0f s while messages wait; "
                        "rebuilding it",
                        consumer.queue,
                        now - consumer.last_arrival,
                    )
                    broken = True
        if broken:
            if consumer.alive:
                logger.warning(
                    "the consumer of %r is gone (channel closed or consumer cancelled); "
                    "consuming again",
                    consumer.queue,
                )
            await self.rebuild(consumer)
            return self.by_queue.get(consumer.queue)
        return consumer

    async def passive(self, queue: str) -> Any:
        """``queue.declare`` passive on a channel of its own: a missing queue closes that one."""
        channel = await self.connection.channel()
        try:
            return await channel.queue_declare(queue, passive=True)
        finally:
            if not channel.is_closed:
                await channel.close()

    async def fetch(
        self,
        queue: str,
        max_messages: int,
        *,
        timeout: float,
        wake: asyncio.Event | Signal | None = None,
    ) -> list[Delivery]:
        consumer = self.by_queue.get(queue)
        if consumer is None:
            if queue not in self.prefetch_of:
                await self.prefetch(queue, DEFAULT_PREFETCH)
            consumer = self.by_queue.get(queue)
        if consumer is not None:
            consumer = await self.check(consumer, max_messages)
        if consumer is None:  # not connected: wait a little, as an empty queue would
            await wait_either(self.connection.connected, wake, min(timeout, 1.0))
            return []
        if not consumer.buffer and timeout > 0:
            consumer.arrived.clear()
            await wait_either(consumer.arrived, wake, timeout)
        out: list[Delivery] = []
        while consumer.buffer and len(out) < max_messages:
            out.append(self.delivery(consumer, consumer.buffer.popleft()))
        consumer.flush_stragglers(force=False)
        return out

    def delivery(self, consumer: Consumer, message: Delivered) -> Delivery:
        tag = next(self.tags)
        self.held[tag] = Held(consumer, message)
        _, _, redelivered, _, message_id, reply_to, _, _, headers, body = message
        if headers is None:
            return Delivery(
                tag, consumer.queue, body, message_id, 1 + redelivered, 0, None, reply_to
            )
        try:
            retries = int(headers.get(HEADER_RETRIES, 0))
        except (TypeError, ValueError):
            retries = 0
        # quorum queues count every delivery before this one
        count = headers.get("x-delivery-count")
        before = count if isinstance(count, int) else (1 if redelivered else 0)
        return Delivery(
            tag=tag,
            queue=consumer.queue,
            body=body,
            message_id=message_id,
            attempts=retries + 1 + before,
            retries=retries,
            headers={
                str(k): str(v) for k, v in headers.items() if isinstance(v, (str, int, float, bool))
            }
            or None,
            reply_to=reply_to,
        )

    def held_of(self, queue: str) -> int:
        """Deliveries of ``queue`` on this host: handed on and not settled, or buffered."""
        consumer = self.by_queue.get(queue)
        held = sum(1 for h in self.held.values() if h.consumer.queue == queue)
        return held + (len(consumer.buffer) if consumer else 0)
