"""``amqp://`` and ``amqps://``: RabbitMQ through aiormq, the facade over the rooms below.

One connection per supervisor (``connection``). Each queue has one consumer on its own channel,
whose ``basic.qos`` is the host's prefetch for that queue (``consumer``). Publishing goes through
one channel in confirm mode (``publish``). Acks, retries through TTL queues, dead letters and
releases are ``settle``'s; the management API's counts ``management``'s.

When the connection drops, deliveries not yet settled are RabbitMQ's again: it redelivers them
(at-least-once: a handler may run twice). The connection reconnects with exponential backoff and
jitter, declares again and consumes again; settling a delivery of the lost connection is a no-op.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from fastq.broker.amqp import management
from fastq.broker.amqp.connection import Connection, Options
from fastq.broker.amqp.consumer import Consumers
from fastq.broker.amqp.dlq import DeadLetters
from fastq.broker.amqp.leader import Elections
from fastq.broker.amqp.publish import Publisher, SyncPublisher
from fastq.broker.amqp.replies import Replies
from fastq.broker.amqp.settle import Settler
from fastq.broker.base import (
    Broker,
    DeadLetter,
    Delivery,
    Message,
    QueueDepth,
    QueueOptions,
    Retry,
    Signal,
    StoredResult,
)
from fastq.errors import ConfigError

T = TypeVar("T")


class AMQPBroker(Broker):
    """See the module docstring. Every coroutine runs on the loop that opened it;
    ``publish_sync`` runs its own connection on a thread of its own.

    Raises:
        ConfigError: the URL is not an AMQP URL or one of its options is out of range.
    """

    #: every unacked message is tracked by the queue's and the channel's processes
    unsettled_costs = True

    def __init__(self, url: str, *, routes: dict[str, QueueOptions] | None = None) -> None:
        self.options = Options(url)
        self.url = self.options.masked
        self.publish_timeout = self.options.publish_timeout
        #: each queue's exchange, binding and type; a sync publisher shares the same dict
        self.routes: dict[str, QueueOptions] = {} if routes is None else routes
        self.connection = Connection(
            self.options, self.routes, self._restore, self._lost, self._consumers_lost
        )
        self.consumers = Consumers(self.connection)
        self.publisher = Publisher(self.connection)
        self.settler = Settler(self.connection, self.consumers, self.publisher)
        self.replies = Replies(self.connection, self.publisher)
        self.elections = Elections(self.connection)
        self.dlq = DeadLetters(self.connection, self.publisher)
        self._sync: SyncPublisher | None = None
        self._sync_lock = threading.Lock()

    async def _restore(self, first: bool) -> None:
        await self.consumers.restore(first)
        await self.elections.restore()

    def _consumers_lost(self) -> None:
        self.consumers.lost()

    def _lost(self) -> None:
        self.consumers.lost()
        self.replies.lost()
        self.elections.lost()

    async def open(self) -> None:
        await self.connection.open()

    async def declare(self, queue: str) -> None:
        if queue not in self.connection.queues:
            self.connection.queues.append(queue)
        await self.connection.ready()
        await self.connection.declare(queue)

    def configure(self, queue: str, options: QueueOptions) -> None:
        self.routes[queue] = options
        self.connection.declared.discard(queue)

    async def publish(self, queue: str, messages: Sequence[Message]) -> None:
        await self.publisher.publish(queue, messages)

    def publish_sync(self, queue: str, messages: Sequence[Message]) -> None:
        self._sync_publisher().publish(queue, messages)

    def _sync_publisher(self) -> SyncPublisher:
        with self._sync_lock:
            if self._sync is None:
                self._sync = SyncPublisher(
                    lambda: AMQPBroker(self.options.given, routes=self.routes)
                )
            return self._sync

    # -- periodic ticks: a leader per App (fastq.broker.amqp.leader) --------------------------

    async def lead(self, group: str) -> None:
        await self.elections.lead(group)

    def leading(self, group: str) -> bool:
        return self.elections.leading(group)

    async def publish_tick(self, schedule: str, tick: float, queue: str, message: Message) -> bool:
        """The leader's: publish the tick (confirmed), then record it; False when this process
        does not lead (any more)."""
        election = self.elections.of(schedule)
        if not election.leading:
            return False
        await self.publisher.publish(queue, [message])
        await election.record(schedule, tick)
        return True

    async def last_tick(self, schedule: str) -> float | None:
        return (await self.elections.of(schedule).last()).get(schedule)

    # -- calls: direct reply-to (fastq.broker.amqp.replies) ---------------------------------

    replies_directly = True

    async def request(self, queue: str, m: Message, timeout: float | None) -> bytes:
        """Publish ``m`` as a call on this broker's connection; the outcome bytes."""
        await self.connection.open()
        return await self.replies.request(queue, m, timeout)

    def call_sync(self, queue: str, m: Message, timeout: float | None) -> bytes:
        """A call from code without a loop, on the publishing thread's connection."""
        return self._sync_publisher().request(queue, m, timeout)

    async def call_async(self, queue: str, m: Message, timeout: float | None) -> bytes:
        """A call from a coroutine of any loop, on the publishing thread's connection."""
        return await self._sync_publisher().request_async(queue, m, timeout)

    async def reply(self, replies: Sequence[StoredResult]) -> None:
        await self.replies.reply(replies)

    # -- publish_to=fastq.Route(...) --------------------------------------------------------

    has_exchanges = True

    async def declare_exchange(self, exchange: str, kind: str) -> None:
        await self.connection.ready()
        await self.connection.declare_exchange(exchange, kind)

    async def publish_routed(
        self, exchange: str, kind: str, routing_key: str, messages: Sequence[Message]
    ) -> None:
        await self.publisher.publish_routed(exchange, kind, routing_key, messages)

    async def prefetch(self, queue: str, prefetch: int) -> None:
        await self.consumers.prefetch(queue, prefetch)

    async def fetch(
        self,
        queue: str,
        max_messages: int,
        *,
        timeout: float,
        wake: asyncio.Event | Signal | None = None,
    ) -> list[Delivery]:
        return await self.consumers.fetch(queue, max_messages, timeout=timeout, wake=wake)

    async def settle(
        self,
        queue: str,
        *,
        ack: Sequence[int] = (),
        retry: Sequence[Retry] = (),
        dead: Sequence[tuple[int, str]] = (),
        release: Sequence[int] = (),
    ) -> None:
        await self.settler.settle(queue, ack=ack, retry=retry, dead=dead, release=release)

    def buffered(self, queue: str) -> int:
        consumer = self.consumers.by_queue.get(queue)
        return len(consumer.buffer) if consumer is not None else 0

    async def queue_depth(self, queue: str) -> QueueDepth:
        """Ready and consumers from ``queue.declare`` (passive); dead letters from the dlq's;
        unacked of every host from RabbitMQ's management API when it answers (port
        ``management_port``, default 15672, same credentials), else this process's own."""
        await self.connection.ready()
        ok = await self.consumers.passive(queue)
        dlq = f"{queue}.dlq"
        dead = await self.consumers.passive(dlq) if dlq in self.connection.declared else None
        o = self.options
        unacked = await asyncio.get_running_loop().run_in_executor(
            None,
            management.unacked_everywhere,
            o.aiormq_url,
            o.management_port,
            o.management_port_given,
            queue,
        )
        dead_count = (dead.message_count or 0) if dead else 0
        if unacked is None:
            return QueueDepth(
                ready=ok.message_count or 0,
                unacked=self.consumers.held_of(queue),
                dead=dead_count,
                consumers=ok.consumer_count,
                unacked_scope="this process",
            )
        return QueueDepth(
            ready=ok.message_count or 0,
            unacked=unacked,
            consumers=ok.consumer_count,
            dead=dead_count,
        )

    # -- operating: dead letters (<queue>.dlq) and purges (fastq.broker.amqp.dlq) -----------

    dead_letter_key = "message_id"

    def _blocking(self, work: Callable[[AMQPBroker], Coroutine[Any, Any, T]]) -> T:
        """``work`` on the publishing thread's broker (its own connection), from any thread."""
        sync = self._sync_publisher()
        broker = sync.broker
        assert isinstance(broker, AMQPBroker)
        return sync.run(work(broker))

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        if queue is None:
            raise ConfigError("RabbitMQ keeps dead letters per queue (<queue>.dlq): name one")
        return self._blocking(lambda b: b.dlq.list(queue, limit))

    def dead_letter(self, id: int | str, *, queues: Sequence[str] = ()) -> DeadLetter | None:
        return self._blocking(lambda b: b.dlq.find(str(id), queues))

    def requeue_dead_letters(
        self, ids: Sequence[Any] | None = None, *, queue: str | None = None
    ) -> int:
        """``ids``: message ids (RabbitMQ numbers nothing); ``queue`` is needed."""
        if queue is None:
            raise ConfigError("RabbitMQ keeps dead letters per queue (<queue>.dlq): name one")
        wanted = None if ids is None else [str(i) for i in ids]
        return self._blocking(lambda b: b.dlq.requeue(queue, wanted))

    def purge(self, queue: str) -> int:
        return self._blocking(lambda b: b.dlq.purge(queue))

    def purge_dead_letters(self, queue: str) -> int:
        return self._blocking(lambda b: b.dlq.purge(f"{queue}.dlq"))

    async def close(self) -> None:
        for consumer in list(self.consumers.by_queue.values()):
            try:
                consumer.flush_stragglers(force=True)
            except Exception:  # noqa: BLE001, S110 - closing anyway; RabbitMQ redelivers what was not acked
                pass
        await self.connection.close()
        if self._sync is not None:
            self._sync.close()
            self._sync = None
