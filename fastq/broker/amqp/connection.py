"""The connections to RabbitMQ: the URL's options, connecting with backoff, the watcher that
reconnects, aiormq's connection with the publishing channel in confirm mode and the topology
(queues, dead-letter queues, exchanges, bindings, retry TTL queues) declared on it, again after
each reconnect, and beside it fastq's own connection (fastq.broker.amqp.stream) for the
consumers and for confirmed publishes (fastq.broker.amqp.outbox). The two come and go together:
when either is lost, both are made again and the consumers consume again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import urllib.parse
from collections.abc import Awaitable, Callable

import aiormq
import aiormq.abc

from fastq.broker.amqp.outbox import Outbox
from fastq.broker.amqp.stream import Stream
from fastq.broker.base import QueueOptions, mask_url, query_float, scrub
from fastq.errors import BrokerConnectionError, ConfigError

logger = logging.getLogger(__name__)

#: what a lost connection or a closed channel raises: the operation is tried again once connected
CONNECTION_ERRORS = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
)
#: publishes awaiting their confirm at once, per channel
CONFIRM_WINDOW = 512
#: seconds between reconnect attempts: doubling from RECONNECT_MIN to RECONNECT_MAX, with jitter;
#: a connect that fails is cheap, and a send waits for the next one once RabbitMQ is back
RECONNECT_MIN, RECONNECT_MAX = 0.2, 2.0
#: how often the watcher looks at the connection
WATCH_SECONDS = 0.25
#: a publish waits this long for a connection, or for its confirm, before it raises
#: BrokerConnectionError
PUBLISH_TIMEOUT = 60.0
#: a retry queue unused this long (no declare; at least twice its TTL) is deleted by RabbitMQ
RETRY_EXPIRES_MS = 3_600_000
#: our own options in the URL's query; the rest is aiormq's (TLS files, heartbeat, ...)
OWN_OPTIONS = ("confirm_window", "publish_timeout", "management_port")


def retry_queue(queue: str, delay: float, *, send: bool = False) -> tuple[str, int]:
    """The TTL queue for ``delay`` seconds: a retry's rounded to two significant digits of
    milliseconds (>= 1), a send's (``send(delay=...)``, ``eta=``) rounded up to three, so that
    it never runs early and at most 1% late."""
    ms = max(1, round(delay * 1000)) if not send else max(1, math.ceil(delay * 1000))
    keep = 3 if send else 2
    digits = len(str(ms))
    if digits > keep:
        step = 10 ** (digits - keep)
        ms = (-(-ms // step) if send else round(ms / step)) * step
    return f"{queue}.retry.{ms}", ms


class Options:
    """An ``amqp://`` or ``amqps://`` URL: ours, and what goes to aiormq."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme.lower() not in ("amqp", "amqps"):
            raise ConfigError(
                f"not an AMQP URL: {mask_url(url)!r}; expected amqp://user:pass@host:port/vhost"
            )
        if not parts.hostname:
            raise ConfigError(f"AMQP URL {mask_url(url)!r} names no host")
        params = urllib.parse.parse_qs(parts.query)
        self.confirm_window = int(query_float(url, params, "confirm_window", CONFIRM_WINDOW, 1))
        self.publish_timeout = query_float(url, params, "publish_timeout", PUBLISH_TIMEOUT, 0.1)
        self.management_port = int(query_float(url, params, "management_port", 15672, 1))
        self.management_port_given = "management_port" in params
        query = urllib.parse.urlencode(
            [(k, v) for k, vs in params.items() if k not in OWN_OPTIONS for v in vs]
        )
        #: what aiormq connects to (our options taken out)
        self.aiormq_url = urllib.parse.urlunsplit(parts._replace(query=query))
        #: as the user gave it (a sync publisher opens its own connection with it)
        self.given = url
        #: the only form that goes into logs and errors
        self.masked = mask_url(url)

    def scrub(self, text: str) -> str:
        """``text`` without the URL's password, wherever a library put it."""
        return scrub(self.aiormq_url, text.replace(self.aiormq_url, self.masked))


class Connection:
    """The connection, its publishing channel and the topology declared on it.

    Parameters:
        options: the URL's.
        routes: each queue's exchange, binding and type (the broker's ``configure``).
        restore: after every (re)connect (True the first time), before anyone uses it: consume
            again.
        lost: when the connection is gone: forget what it carried.
        stream_lost: when only the consuming connection is gone: forget what it carried (the
            consumers' deliveries); ``lost`` if not given.
    """

    def __init__(
        self,
        options: Options,
        routes: dict[str, QueueOptions],
        restore: Callable[[bool], Awaitable[None]],
        lost: Callable[[], None],
        stream_lost: Callable[[], None] | None = None,
    ) -> None:
        self.options, self.routes, self.restore, self.on_lost = options, routes, restore, lost
        self.on_stream_lost = stream_lost or lost
        self.url = options.masked
        self.connection: aiormq.abc.AbstractConnection | None = None
        #: fastq's own connection, for the consumers and the outbox (made at the first use)
        self.stream: Stream | None = None
        #: its confirm-mode channel, for publishing (made at the first publish)
        self._outbox: Outbox | None = None
        self.publisher: aiormq.abc.AbstractChannel | None = None
        self.window: asyncio.Semaphore | None = None
        #: queues and dead-letter queues declared on this connection
        self.declared: set[str] = set()
        self.retry_declared: dict[str, float] = {}  # retry queue -> when it was last declared
        #: declared by the caller: declared again after a reconnect
        self.queues: list[str] = []
        #: bumped at each connect: work of an older connection is dropped
        self.generation = 0
        self.connected = asyncio.Event()
        self.closing = False
        self.watcher: asyncio.Task[None] | None = None
        #: set to make the watcher look at the connection now
        self.poked = asyncio.Event()

    async def open(self) -> None:
        if self.connection is not None:
            return
        self.closing = False
        await self.connect(first=True)
        self.watcher = asyncio.get_running_loop().create_task(self.watch())

    async def connect(self, *, first: bool = False) -> None:
        """Connect, open the publishing channel, declare and consume again; until it works
        (the first time: raise BrokerConnectionError instead)."""
        delay = RECONNECT_MIN
        while True:
            connection: aiormq.abc.AbstractConnection | None = None
            try:
                connection = await aiormq.connect(self.options.aiormq_url)
                self.connection = connection
                self.generation += 1
                self.drop_stream()
                self.publisher = await connection.channel(publisher_confirms=True)
                self.window = asyncio.Semaphore(self.options.confirm_window)
                self.declared.clear()
                self.retry_declared.clear()
                for queue in self.queues:
                    await self.declare(queue)
                await self.restore(first)
                break
            except Exception as e:
                text = f"{type(e).__name__}: {self.options.scrub(str(e))}"
                self.lost()
                self.connection = None
                self.drop_stream()
                if connection is not None:
                    try:
                        await connection.close()
                    except Exception:  # noqa: BLE001, S110 - it is broken already
                        pass
                if first:
                    raise BrokerConnectionError(
                        f"cannot connect to RabbitMQ at {self.url} ({text}): {_hint(e)}"
                    ) from e
                logger.warning(
                    "RabbitMQ at %s unreachable (%s); trying again in %.1f s", self.url, text, delay
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, RECONNECT_MAX)
        self.connected.set()

    async def watch(self) -> None:
        """Reconnect whenever the connection closes, until ``close``. It looks every
        ``WATCH_SECONDS`` (or at once when ``ready`` found the connection dead) rather than
        awaiting ``connection.closing``, which aiormq may cancel while the connection lives on
        (seen when a channel is closed)."""
        while not self.closing:
            connection, stream = self.connection, self.stream
            if (
                connection is not None
                and not connection.is_closed
                and (stream is None or not stream.is_closed)
            ):
                self.poked.clear()
                try:
                    await asyncio.wait_for(self.poked.wait(), WATCH_SECONDS)
                except TimeoutError:
                    pass
                continue
            if self.closing:
                return
            if (  # the consuming connection went alone
                connection is not None
                and not connection.is_closed
                and stream is not None
                and await self.consume_again(stream)
            ):
                continue
            logger.warning(
                "connection to RabbitMQ at %s lost; its unsettled deliveries go back to RabbitMQ",
                self.url,
            )
            self.lost()
            self.drop_stream()
            if connection is not None and not connection.is_closed:
                with contextlib.suppress(Exception):
                    await connection.close()
            try:
                await self.connect()
            except Exception:
                logger.exception("reconnecting to RabbitMQ at %s failed; trying again", self.url)
                await asyncio.sleep(RECONNECT_MAX)

    def lost(self) -> None:
        self.connected.clear()
        self.on_lost()

    async def consume_again(self, stream: Stream) -> bool:
        """The consuming connection went and aiormq's lives (RabbitMQ closed that one, or its
        bytes were out of step): the consumers forget what it held (RabbitMQ requeued it) and
        consume on a new one; publishing goes on meanwhile. False if that failed: then both
        connections are made again."""
        logger.warning(
            "the consuming connection to RabbitMQ at %s was lost (%s); what it held goes back "
            "to RabbitMQ",
            self.url,
            self.options.scrub(stream.closed_because),
        )
        self.on_stream_lost()
        self.drop_stream()
        try:
            await self.restore(False)
        except Exception as e:  # noqa: BLE001 - whatever it was, both connections are made again
            logger.warning(
                "consuming again failed (%s: %s)", type(e).__name__, self.options.scrub(str(e))
            )
            return False
        return True

    def deadline(self) -> float:
        """When a publish that starts now gives up: ``publish_timeout`` seconds from now."""
        return time.monotonic() + self.options.publish_timeout

    async def ready(self, deadline: float | None = None) -> aiormq.abc.AbstractChannel:
        """The publishing channel once it works: waits for a reconnect (the watcher's) while
        the connection is down, opens another channel when RabbitMQ closed this one alone, and
        never hands out a channel of a connection that is gone, even before the watcher saw it
        go.

        Raises:
            BrokerConnectionError: no working channel by ``deadline`` (default: the publish
                timeout from now).
        """
        deadline = self.deadline() if deadline is None else deadline
        while True:
            connection = self.connection
            if self.connected.is_set() and (connection is None or connection.is_closed):
                self.lost()  # gone, and the watcher has not looked yet: it looks now
                self.poked.set()
            if not self.connected.is_set():
                try:
                    await asyncio.wait_for(
                        self.connected.wait(), max(0.0, deadline - time.monotonic())
                    )
                except TimeoutError as e:
                    raise BrokerConnectionError(
                        f"no connection to RabbitMQ at {self.url} for "
                        f"{self.options.publish_timeout:g} s (publish_timeout in the URL's "
                        "query sets how long a send waits)"
                    ) from e
                continue
            assert self.publisher is not None and connection is not None
            if not self.publisher.is_closed:
                return self.publisher
            # RabbitMQ closed the channel alone (a channel error): the connection goes on
            logger.warning(
                "RabbitMQ closed the publishing channel on %s; opening another", self.url
            )
            try:
                self.publisher = await connection.channel(publisher_confirms=True)
            except CONNECTION_ERRORS:
                self.lost()  # the connection went with it
                self.poked.set()
                continue
            self.window = asyncio.Semaphore(self.options.confirm_window)

    async def channel(self) -> aiormq.abc.AbstractChannel:
        """A new channel without confirms (a passive declare's)."""
        assert self.connection is not None
        return await self.connection.channel(publisher_confirms=False)

    async def consuming(self) -> Stream:
        """The consuming connection, made with the first consumer of this connection.

        Raises:
            ConnectionError, OSError, TimeoutError: it could not be made, or it is gone (the
                watcher makes both connections again).
        """
        stream = self.stream
        if stream is None:
            stream = self.stream = await Stream.open(self.options.aiormq_url, self.poked.set)
        elif stream.is_closed:  # the watcher makes both connections again
            self.poked.set()
            raise ConnectionError(f"the consuming connection is gone ({stream.closed_because})")
        return stream

    async def outbox(self) -> Outbox:
        """The confirm-mode channel on the consuming connection (made with it if need be).

        Raises:
            ConnectionError, OSError, TimeoutError: as ``consuming`` does.
        """
        stream = await self.consuming()
        outbox = self._outbox
        if outbox is None or outbox.channel.is_closed or outbox.channel.stream is not stream:
            outbox = self._outbox = await Outbox.open(stream)
        return outbox

    def drop_stream(self) -> None:
        self._outbox = None
        if self.stream is not None:
            self.stream.abort()
            self.stream = None

    # -- topology ------------------------------------------------------------------------------

    async def declare(self, queue: str) -> None:
        """The queue (its type and arguments), its dead-letter queue, its exchange and binding."""
        assert self.publisher is not None
        if queue in self.declared:
            return
        route = self.routes.get(queue, QueueOptions())
        channel = self.publisher
        try:
            await channel.queue_declare(queue, durable=True, arguments=route.arguments() or None)
            await channel.queue_declare(f"{queue}.dlq", durable=True)
            if route.exchange:
                await channel.exchange_declare(
                    route.exchange, exchange_type=route.exchange_kind, durable=True
                )
                await channel.queue_bind(
                    queue,
                    route.exchange,
                    routing_key=route.routing_key or queue,
                    arguments=dict(route.binding_arguments or {}) or None,
                )
        except aiormq.exceptions.ChannelPreconditionFailed as e:
            raise await self._refused(
                e, f"{queue!r} as {route}", "delete it, or declare it as it is"
            ) from e
        self.declared.update((queue, f"{queue}.dlq"))

    async def _refused(self, e: Exception, what: str, fix: str) -> ConfigError:
        """RabbitMQ refused to declare ``what`` (it exists with other settings) and closed the
        publishing channel: open another, and say what to change."""
        assert self.connection is not None
        self.publisher = await self.connection.channel(publisher_confirms=True)
        return ConfigError(
            f"RabbitMQ refused to declare {what} ({self.options.scrub(str(e))}): it exists with "
            f"other settings; {fix}"
        )

    async def declare_exchange(self, exchange: str, kind: str) -> None:
        """A durable exchange of ``kind`` (``publish_to=fastq.Route(...)``), once per connection.

        Raises:
            ConfigError: it exists as another kind (RabbitMQ refused; says what to change).
        """
        key = f"exchange {exchange}"
        if key in self.declared:
            return
        assert self.publisher is not None
        try:
            await self.publisher.exchange_declare(exchange, exchange_type=kind, durable=True)
        except aiormq.exceptions.ChannelPreconditionFailed as e:
            raise await self._refused(
                e, f"exchange {exchange!r} as a durable {kind} exchange", "give the Route its kind"
            ) from e
        self.declared.add(key)

    async def declare_retry(
        self, channel: aiormq.abc.AbstractChannel, queue: str, delay: float, *, send: bool = False
    ) -> str:
        """The TTL queue for ``delay``. It expires when unused for ``RETRY_EXPIRES`` (or twice
        its TTL): a declare counts as a use, and RabbitMQ counts from the last one, not from
        the last publish, so it is declared again whenever a quarter of that time passed."""
        name, ms = retry_queue(queue, delay, send=send)
        expires = max(RETRY_EXPIRES_MS, 2 * ms + 60_000)
        now = time.monotonic()
        if now - self.retry_declared.get(name, -1e18) > expires / 4000:
            await channel.queue_declare(
                name,
                durable=True,
                arguments={
                    "x-message-ttl": ms,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": queue,
                    "x-expires": expires,
                },
            )
            self.retry_declared[name] = now
        return name

    async def close(self) -> None:
        self.closing = True
        self.lost()
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None
        if self.stream is not None:
            await self.stream.close()
            self.stream = None
        if self.connection is not None:
            await self.connection.close()
            self.connection = None


def _hint(e: BaseException) -> str:
    """What to check when the first connection fails, from what failed."""
    text = str(e)
    if (
        isinstance(
            e,
            (aiormq.exceptions.AuthenticationError, aiormq.exceptions.ProbableAuthenticationError),
        )
        or "ACCESS_REFUSED" in text
    ):
        return "RabbitMQ refused the user name or password; check them in the URL"
    if "vhost" in text or "NOT_ALLOWED" in text or "Connection.Close" in text:
        return "the virtual host (the URL's path) does not exist, or this user may not use it"
    if isinstance(e, ConnectionRefusedError) or "Connection refused" in text:
        return "nothing listens there; is RabbitMQ running on that host and port?"
    if isinstance(e, OSError | TimeoutError):
        return "the host does not answer; check its name, port and the network"
    return "check the URL and that RabbitMQ runs there"
