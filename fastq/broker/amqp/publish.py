"""Publishing with confirms: ``publish`` returns when RabbitMQ confirmed every message (a bounded
window of them in flight at once); messages are persistent (delivery_mode 2) on durable queues.
A connection lost meanwhile publishes the unconfirmed ones again once it is back (so a message
may arrive twice, never not). ``SyncPublisher`` is ``publish_sync``: a connection of its own on a
thread of its own, for code without an event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import aiormq
import aiormq.abc
from pamqp.commands import Basic

from fastq.broker.amqp.connection import CONNECTION_ERRORS, Connection
from fastq.broker.base import Message
from fastq.errors import BrokerConnectionError

logger = logging.getLogger(__name__)

#: the content type of a fastq envelope; raw messages of consumers keep theirs
MSGPACK = "application/msgpack"
#: a batch whose publishes keep failing (returned, nacked) is given up after this many tries
PUBLISH_ATTEMPTS = 20


class Nacked(Exception):
    """RabbitMQ answered a publish with basic.nack."""


class Unroutable(Exception):
    """RabbitMQ returned a mandatory publish: declared again, it is published again."""


def _transient(e: BaseException) -> bool:
    return isinstance(e, (*CONNECTION_ERRORS, asyncio.CancelledError, TimeoutError, Unroutable))


class Publisher:
    """Confirmed publishes on the connection's publishing channel."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def publish(self, queue: str, messages: Sequence[Message]) -> None:
        """Publish and wait for RabbitMQ's confirm of each (see the module docstring)."""
        conn = self.connection
        pending, attempts = list(messages), 0
        while pending:
            channel = await conn.ready()
            try:
                await conn.declare(queue)
                results = await asyncio.gather(
                    *[self.publish_one(channel, queue, m) for m in pending], return_exceptions=True
                )
            except CONNECTION_ERRORS as e:
                logger.warning(
                    "publishing to %r on %s failed (%s); waiting for the connection",
                    queue,
                    conn.url,
                    type(e).__name__,
                )
                await conn.wait_reconnect()
                continue
            failed = [m for m, r in zip(pending, results) if isinstance(r, BaseException)]
            hard = [r for r in results if isinstance(r, BaseException) and not _transient(r)]
            if hard:
                raise BrokerConnectionError(
                    f"RabbitMQ at {conn.url} refused a publish to {queue!r}: "
                    f"{conn.options.scrub(str(hard[0]))}"
                ) from hard[0]
            attempts += 1
            if failed and attempts > PUBLISH_ATTEMPTS:
                raise BrokerConnectionError(
                    f"publishing {len(failed)} messages to {queue!r} on "
                    f"{conn.url} failed {PUBLISH_ATTEMPTS} times: "
                    f"{results[0]!r}"
                )
            if failed and not all(
                isinstance(r, Unroutable) for r in results if isinstance(r, BaseException)
            ):
                await conn.wait_reconnect()
            pending = failed

    async def publish_one(
        self, channel: aiormq.abc.AbstractChannel, queue: str, m: Message
    ) -> None:
        conn = self.connection
        exchange = ""
        headers: dict[str, Any] = dict(m.headers or {})
        route = conn.routes.get(queue)
        routing_key = queue
        if m.delay > 0:  # through the TTL queue, which dead-letters straight into the queue
            routing_key = await conn.declare_retry(channel, queue, m.delay)
        elif route is not None and route.exchange:
            exchange, routing_key = route.exchange, route.routing_key or queue
            for k, v in (route.binding_arguments or {}).items():
                if not k.startswith("x-"):
                    headers.setdefault(k, v)
        properties = Basic.Properties(
            delivery_mode=2,
            message_id=m.message_id or None,
            content_type=headers.pop("content-type", MSGPACK),
            headers=headers or None,
        )
        await self.confirmed(channel, queue, m.body, properties, exchange, routing_key)

    async def confirmed(
        self,
        channel: aiormq.abc.AbstractChannel,
        queue: str,
        body: bytes,
        properties: Basic.Properties,
        exchange: str,
        routing_key: str,
    ) -> None:
        """Publish one message (mandatory, persistent) within the confirm window and wait for
        RabbitMQ's confirm. A return (no queue took it: ``queue``'s topology was deleted
        meanwhile?) forgets that ``queue`` was declared, so that the next try declares it again."""
        conn = self.connection
        assert conn.window is not None
        async with conn.window:
            try:
                confirm = await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=True,
                    timeout=conn.options.publish_timeout,
                )
            except aiormq.exceptions.PublishError as e:
                conn.declared.discard(queue)
                conn.retry_declared.pop(routing_key, None)
                raise Unroutable(
                    f"no queue took message {properties.message_id!r} for {routing_key!r}"
                ) from e
        if not isinstance(confirm, Basic.Ack):
            raise Nacked(
                f"RabbitMQ did not confirm message {properties.message_id!r} to "
                f"{routing_key!r}: {confirm!r}"
            )


class Publishing(Protocol):
    """What the sync publisher's own broker does (an AMQPBroker)."""

    publish_timeout: float
    url: str

    async def open(self) -> None: ...

    async def publish(self, queue: str, messages: Sequence[Message]) -> None: ...

    async def close(self) -> None: ...


class SyncPublisher:
    """``publish_sync``: a broker of its own (``make()``) on a loop and thread of their own,
    opened once and shared by every thread that publishes."""

    def __init__(self, make: Callable[[], Publishing]) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="fastq-amqp-publish", daemon=True
        )
        self.thread.start()
        self.broker = make()
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
        except TimeoutError as e:
            future.cancel()
            raise BrokerConnectionError(
                f"publishing to {queue!r} on {self.broker.url} took over {self.timeout:g} s"
            ) from e

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
