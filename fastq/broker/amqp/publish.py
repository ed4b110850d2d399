"""Publishing with confirms: ``publish`` returns when RabbitMQ confirmed every message (a bounded
window of them in flight at once); messages are persistent (delivery_mode 2) on durable queues.
Sends and outputs go through the outbox (fastq.broker.amqp.outbox: a batch encoded by fastq and
written at once); retry and dead-letter copies and calls (direct reply-to) through aiormq.
A connection lost meanwhile publishes the unconfirmed ones again once it is back (so a message
may arrive twice, never not). ``SyncPublisher`` is ``publish_sync``: a connection of its own on a
thread of its own, for code without an event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import aiormq
import aiormq.abc
from pamqp.commands import Basic

from fastq.broker.amqp.connection import CONNECTION_ERRORS, Connection
from fastq.broker.amqp.outbox import Nacked, Outbox, Unroutable, publish_frames
from fastq.broker.base import Message
from fastq.errors import BrokerConnectionError

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: the content type of a fastq envelope; raw messages of consumers keep theirs
MSGPACK = "application/msgpack"
#: seconds between two tries of the messages not confirmed yet; doubling, to at most
PAUSE_MIN, PAUSE_MAX = 0.02, 0.5


def _transient(e: BaseException) -> bool:
    return isinstance(
        e, (*CONNECTION_ERRORS, OSError, asyncio.CancelledError, TimeoutError, Unroutable)
    )


class Publisher:
    """Confirmed publishes on the connection's publishing channel."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def publish(self, queue: str, messages: Sequence[Message]) -> None:
        """Publish and wait for RabbitMQ's confirm of each (see the module docstring). While
        the connection is down (a restart, a blip) it waits for the reconnect, up to
        ``publish_timeout`` seconds in all, and only then fails.

        Raises:
            BrokerConnectionError: not every message was confirmed within the publish timeout
                (those not confirmed may still arrive: at-least-once), or RabbitMQ refused one.
        """
        conn = self.connection
        deadline = conn.deadline()
        pending, pause = list(messages), PAUSE_MIN
        while pending:
            channel = await conn.ready(deadline)
            try:
                await conn.declare(queue)
                results = await self.batch(await conn.outbox(), channel, queue, pending, deadline)
            except (*CONNECTION_ERRORS, OSError, TimeoutError) as e:
                results = [e] * len(pending)
            if any(isinstance(r, Unroutable) for r in results):  # its topology went: again
                conn.declared.discard(queue)
                conn.retry_declared.clear()
            failed = [
                m for m, r in zip(pending, results, strict=True) if isinstance(r, BaseException)
            ]
            errors = [r for r in results if isinstance(r, BaseException)]
            hard = [r for r in errors if not _transient(r)]
            if hard:
                raise BrokerConnectionError(
                    f"RabbitMQ at {conn.url} refused a publish to {queue!r}: "
                    f"{conn.options.scrub(str(hard[0]))}"
                ) from hard[0]
            if failed and time.monotonic() >= deadline:
                raise BrokerConnectionError(
                    f"publishing {len(failed)} of {len(messages)} messages to {queue!r} on "
                    f"{conn.url} failed for {conn.options.publish_timeout:g} s (last: "
                    f"{conn.options.scrub(repr(errors[-1]))}); publish_timeout in the URL's "
                    "query sets how long a send waits"
                ) from errors[-1]
            if failed:
                if not all(isinstance(r, Unroutable) for r in errors):
                    logger.info(
                        "publishing to %r on %s: %d not confirmed (%s); waiting for the connection",
                        queue,
                        conn.url,
                        len(failed),
                        type(errors[-1]).__name__,
                    )
                # a moment for a dead channel or connection to show (ready() then waits for the
                # reconnect), growing so that a down broker is not hammered
                await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
                pause = min(pause * 2, PAUSE_MAX)
            pending = failed

    async def publish_routed(
        self, exchange: str, kind: str, routing_key: str, messages: Sequence[Message]
    ) -> None:
        """Publish to an exchange, each confirmed but not mandatory (what no binding takes is
        dropped, as on any exchange). A failure raises: the caller tries the batch again.

        Raises:
            BrokerConnectionError: the connection did not come back within publish_timeout.
            ConfigError: the exchange exists as another kind.
        """
        conn = self.connection
        await conn.ready()
        await conn.declare_exchange(exchange, kind)
        outbox = await conn.outbox()
        frames = [
            _frames(outbox, m, exchange, routing_key, dict(m.headers or {}), mandatory=False)
            for m in messages
        ]
        for r in await self.confirm(outbox, frames, conn.deadline()):
            if r is not None:
                raise r

    async def batch(
        self,
        outbox: Outbox,
        channel: aiormq.abc.AbstractChannel,
        queue: str,
        messages: Sequence[Message],
        deadline: float,
    ) -> list[BaseException | None]:
        """Publish ``messages`` to ``queue`` through the outbox, ``confirm_window`` in flight at
        a time; what became of each (None: confirmed)."""
        frames = []
        for m in messages:
            exchange, routing_key, headers = await self.route(channel, queue, m)
            frames.append(_frames(outbox, m, exchange, routing_key, headers))
        return await self.confirm(outbox, frames, deadline)

    async def route(
        self, channel: aiormq.abc.AbstractChannel, queue: str, m: Message
    ) -> tuple[str, str, dict[str, Any]]:
        """Where ``m`` for ``queue`` is published (exchange, routing key) and its headers: a
        delay through the TTL queue, which dead-letters straight into the queue; a queue bound
        to an exchange through it, with its binding's headers."""
        conn = self.connection
        exchange, routing_key = "", queue
        headers: dict[str, Any] = dict(m.headers or {})
        route = conn.routes.get(queue)
        if m.delay > 0:
            routing_key = await conn.declare_retry(channel, queue, m.delay, send=True)
        elif route is not None and route.exchange:
            exchange, routing_key = route.exchange, route.routing_key or queue
            for k, v in (route.binding_arguments or {}).items():
                if not k.startswith("x-"):
                    headers.setdefault(k, v)
        return exchange, routing_key, headers

    async def confirm(
        self, outbox: Outbox, frames: Sequence[tuple[bytes, str]], deadline: float
    ) -> list[BaseException | None]:
        """Write ``frames`` (a publish each), ``confirm_window`` in flight at a time, and wait
        for their confirms until ``deadline``."""
        window = self.connection.options.confirm_window
        results: list[BaseException | None] = []
        for at in range(0, len(frames), window):
            futures = outbox.publish(frames[at : at + window])
            await asyncio.wait(futures, timeout=max(0.0, deadline - time.monotonic()))
            for f in futures:
                if not f.done():
                    f.cancel()
                    results.append(TimeoutError("no confirm within publish_timeout"))
                else:
                    results.append(f.exception())
        return results

    async def publish_one(
        self,
        channel: aiormq.abc.AbstractChannel,
        queue: str,
        m: Message,
        *,
        reply_to: str | None = None,
    ) -> None:
        exchange, routing_key, headers = await self.route(channel, queue, m)
        properties = Basic.Properties(
            delivery_mode=2,
            message_id=m.message_id or None,
            content_type=headers.pop("content-type", MSGPACK),
            headers=headers or None,
            reply_to=reply_to,
            correlation_id=m.message_id if reply_to else None,
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


def _frames(
    outbox: Outbox,
    m: Message,
    exchange: str,
    routing_key: str,
    headers: dict[str, Any],
    *,
    mandatory: bool = True,
) -> tuple[bytes, str]:
    """``m``'s publish frames for ``outbox``, and its message id."""
    content_type = headers.pop("content-type", MSGPACK)
    frames = publish_frames(
        outbox.channel.number,
        exchange,
        routing_key,
        m.body,
        frame_max=outbox.frame_max,
        mandatory=mandatory,
        message_id=m.message_id,
        content_type=content_type,
        headers=headers,
    )
    return frames, m.message_id


class Publishing(Protocol):
    """What the sync publisher's own broker does (an AMQPBroker)."""

    publish_timeout: float
    url: str

    async def open(self) -> None: ...

    async def publish(self, queue: str, messages: Sequence[Message]) -> None: ...

    async def request(self, queue: str, m: Message, timeout: float | None) -> bytes: ...

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

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Any coroutine on this publisher's loop (its broker's), from another thread."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(self.timeout)

    def request(self, queue: str, m: Message, timeout: float | None) -> bytes:
        """A call (``Replies.request``) on this publisher's loop; its outcome."""
        future = asyncio.run_coroutine_threadsafe(self.broker.request(queue, m, timeout), self.loop)
        return future.result()

    async def request_async(self, queue: str, m: Message, timeout: float | None) -> bytes:
        """``request`` for a coroutine on another loop."""
        return await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(self.broker.request(queue, m, timeout), self.loop)
        )

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
