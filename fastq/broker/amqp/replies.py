"""RabbitMQ's direct reply-to, both ends: ``task.call`` without a result store.

The caller consumes the pseudo-queue ``amq.rabbitmq.reply-to`` (no-ack) on a confirm channel of
its own and publishes the request on that same channel with ``reply_to`` set to it and the
message id as ``correlation_id``; RabbitMQ rewrites ``reply_to`` into a name that leads back to
that channel. The supervisor, once the handler finished, publishes the outcome
(``fastq.results.Outcome``) to the default exchange with that name as the routing key, before
it acks the request. No queue, no store: a reply whose caller is gone is dropped by RabbitMQ.
A connection lost while a call waits fails that call (it may have run).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import aiormq
import aiormq.abc
from pamqp.commands import Basic

from fastq.broker.amqp.connection import CONNECTION_ERRORS, Connection
from fastq.broker.amqp.publish import Publisher
from fastq.broker.base import Message, StoredResult
from fastq.errors import BrokerConnectionError

#: the pseudo-queue of direct reply-to
REPLY_TO = "amq.rabbitmq.reply-to"
#: the content type of a reply: a fastq.results.Outcome, msgpack
OUTCOME = "application/x-fastq-outcome"


class Replies:
    """The calls this process waits for, and the supervisor's replies."""

    def __init__(self, connection: Connection, publisher: Publisher) -> None:
        self.connection, self.publisher = connection, publisher
        self.channel: aiormq.abc.AbstractChannel | None = None
        self.waiting: dict[str, asyncio.Future[bytes]] = {}
        self.lock = asyncio.Lock()

    async def _channel(self, deadline: float) -> aiormq.abc.AbstractChannel:
        async with self.lock:
            await self.connection.ready(deadline)
            if self.channel is None or self.channel.is_closed:
                self.lost()  # replies to the old channel cannot come
                assert self.connection.connection is not None
                channel = await self.connection.connection.channel(publisher_confirms=True)
                await channel.basic_consume(REPLY_TO, self._on_reply, no_ack=True)
                self.channel = channel
            return self.channel

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        future = self.waiting.pop(message.header.properties.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    def lost(self) -> None:
        """The channel (or the connection) went: every call waiting on it fails now."""
        self.channel = None
        waiting, self.waiting = self.waiting, {}
        for message_id, future in waiting.items():
            if not future.done():
                future.set_exception(
                    BrokerConnectionError(
                        f"the connection to {self.connection.url} that would carry the reply to "
                        f"message {message_id} was lost; the call may have run: call again if "
                        "it can run twice, else read its result from a result store"
                    )
                )

    async def request(self, queue: str, m: Message, timeout: float | None) -> bytes:
        """Publish ``m`` to ``queue`` as a call and wait for its outcome.

        Raises:
            TimeoutError: no reply within ``timeout``.
            BrokerConnectionError: the request could not be published, or the connection
                carrying the reply was lost.
        """
        conn = self.connection
        channel = await self._channel(conn.deadline())
        future = asyncio.get_running_loop().create_future()
        self.waiting[m.message_id] = future
        try:
            try:
                await conn.declare(queue)
                await self.publisher.publish_one(channel, queue, m, reply_to=REPLY_TO)
            except CONNECTION_ERRORS as e:
                raise BrokerConnectionError(
                    f"the call to {queue!r} on {conn.url} could not be published: "
                    f"{conn.options.scrub(repr(e))}"
                ) from e
            return await asyncio.wait_for(future, timeout)
        finally:
            self.waiting.pop(m.message_id, None)

    async def reply(self, replies: Sequence[StoredResult]) -> None:
        """Send each outcome to its caller (the supervisor's side; confirmed, not mandatory)."""
        conn = self.connection
        channel = await conn.ready()
        assert conn.window is not None

        async def one(r: StoredResult) -> None:
            async with conn.window:  # type: ignore[union-attr]
                await channel.basic_publish(
                    r.outcome,
                    exchange="",
                    routing_key=r.reply_to,
                    properties=Basic.Properties(correlation_id=r.message_id, content_type=OUTCOME),
                    timeout=conn.options.publish_timeout,
                )

        await asyncio.gather(*(one(r) for r in replies))
