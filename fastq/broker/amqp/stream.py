"""fastq's own AMQP 0-9-1 connection, beside aiormq's: it carries the consumers' channels, their
deliveries and their acks, and the confirm-mode channel that sends and outputs are published on
(fastq.broker.amqp.outbox).

Every read off its socket goes through ``FrameReader`` (fastq._amqp, in C, or its twin): a
``basic.deliver`` with its content header and body frames comes out as one tuple, and all the
deliveries of one read reach their channel's callback as one list, so that the pump takes them as
one batch. Acks and nacks are written as ready-made frames, and publish confirms (``basic.ack``,
``basic.nack``) are read without pamqp. Everything rare (the handshake, ``basic.qos``,
``basic.consume``, ``basic.cancel``, a channel or connection closed by RabbitMQ) is encoded and
decoded by pamqp. Declares, retry and dead-letter copies and direct reply-to stay on aiormq's
connection (fastq.broker.amqp.connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import struct
import time
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pamqp import commands, frame

from fastq.broker.amqp.channel import ChannelClosed, StreamChannel
from fastq.errors import FrameError

__all__ = ["ChannelClosed", "Delivered", "Stream", "StreamChannel"]

if TYPE_CHECKING:
    from fastq._amqp import Delivered, FrameReader

    IMPLEMENTATION: str
elif os.environ.get("FASTQ_NO_EXTENSIONS"):
    from fastq._amqp_py import Delivered, FrameReader

    IMPLEMENTATION = "python"
else:
    from fastq._amqp import FrameReader  # an ImportError here means a broken build

    Delivered = tuple
    IMPLEMENTATION = "cython"

logger = logging.getLogger(__name__)

PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
#: the largest frame we ask for (RabbitMQ's default)
FRAME_MAX = 131072
#: seconds the handshake may take before the connect fails
HANDSHAKE_SECONDS = 10.0
#: RabbitMQ's default when the URL names no heartbeat
HEARTBEAT = 60
_HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"
#: class and method of basic.ack and basic.nack, and what follows them (delivery tag, bits)
_CONFIRMS = (b"\x00\x3c\x00\x50", b"\x00\x3c\x00\x78")
_CONFIRM = struct.Struct(">QB")
#: what a client says it can do; consumer_cancel_notify makes RabbitMQ tell us of a queue deleted
CAPABILITIES: dict[str, bool] = {
    "consumer_cancel_notify": True,
    "basic.nack": True,
    "authentication_failure_close": True,
    "connection.blocked": True,
    "per_consumer_qos": True,
}


class Stream(asyncio.Protocol):
    """The connection (see the module docstring). ``open`` connects and shakes hands;
    ``is_closed`` tells whether it still carries anything; ``on_lost`` runs once when it goes."""

    def __init__(self, on_lost: Callable[[], None] | None = None) -> None:
        self.reader = FrameReader(FRAME_MAX)
        self.transport: asyncio.Transport | None = None
        self.channels: dict[int, StreamChannel] = {}
        self.is_closed = False
        self.closed_because = ""
        self.on_lost = on_lost
        self.channel_max = 2047
        self.heartbeat = 0
        self.last_read = time.monotonic()
        self._next_channel = 1
        self._control = StreamChannel(self, 0)  # the connection's own methods
        self._beats: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- connecting ---------------------------------------------------------------------------

    @classmethod
    async def open(cls, url: str, on_lost: Callable[[], None] | None = None) -> Stream:
        """Connect to ``url`` (``amqp://`` or ``amqps://``; the query's ``heartbeat``, ``cafile``,
        ``certfile``, ``keyfile`` and ``no_verify_ssl`` are read) and shake hands.

        Raises:
            ConnectionError, OSError, TimeoutError: as the socket or RabbitMQ said.
        """
        parts = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parts.query))
        secure = parts.scheme.lower() == "amqps"
        port = parts.port or (5671 if secure else 5672)
        loop = asyncio.get_running_loop()
        stream = cls(on_lost)
        async with asyncio.timeout(HANDSHAKE_SECONDS):
            transport, _ = await loop.create_connection(
                lambda: stream,
                parts.hostname or "localhost",
                port,
                ssl=_ssl_context(query) if secure else None,
            )
            stream.transport = transport  # uvloop may call connection_made only later
            try:
                await stream._handshake(
                    urllib.parse.unquote(parts.username or "guest"),
                    urllib.parse.unquote(parts.password or "guest"),
                    urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
                    int(query["heartbeat"]) if "heartbeat" in query else None,
                )
            except BaseException:
                stream.abort()
                raise
        return stream

    async def _handshake(self, user: str, password: str, vhost: str, heartbeat: int | None) -> None:
        control = self._control
        start = control.expect(commands.Connection.Start)
        self.write(PROTOCOL_HEADER)
        await start
        tune = control.expect(commands.Connection.Tune)
        self.write(
            frame.marshal(
                commands.Connection.StartOk(
                    client_properties={
                        "product": "fastq",
                        "platform": "Python",
                        "capabilities": dict(CAPABILITIES),
                        "connection_name": f"fastq stream {os.getpid()}",
                    },
                    mechanism="PLAIN",
                    response=f"\0{user}\0{password}",
                    locale="en_US",
                ),
                0,
            )
        )
        t = await tune
        self.channel_max = t.channel_max or 2047
        frame_max = min(t.frame_max or FRAME_MAX, FRAME_MAX)
        self.heartbeat = t.heartbeat if heartbeat is None else heartbeat
        self.reader.frame_max = frame_max
        self.write(
            frame.marshal(
                commands.Connection.TuneOk(self.channel_max, frame_max, self.heartbeat), 0
            )
        )
        await control.rpc(commands.Connection.Open(virtual_host=vhost), commands.Connection.OpenOk)
        if self.heartbeat:
            self._beats = asyncio.get_running_loop().create_task(self._beat())

    async def _beat(self) -> None:
        """A heartbeat every half interval; a peer silent for two intervals is gone."""
        while not self.is_closed:
            await asyncio.sleep(self.heartbeat / 2)
            if time.monotonic() - self.last_read > 2 * self.heartbeat:
                self.lose(f"RabbitMQ sent nothing for {2 * self.heartbeat} s")
                return
            self.write(_HEARTBEAT)

    async def channel(self) -> StreamChannel:
        """A new channel, open."""
        number = self._free_channel()
        channel = self.channels[number] = StreamChannel(self, number)
        await channel.rpc(commands.Channel.Open(), commands.Channel.OpenOk)
        return channel

    def _free_channel(self) -> int:
        for _ in range(self.channel_max):
            number = self._next_channel
            self._next_channel = number % self.channel_max + 1
            if number not in self.channels:
                return number
        raise ChannelClosed(f"all {self.channel_max} channels of the connection are in use")

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.last_read = time.monotonic()
        try:
            deliveries, frames = self.reader.feed(data)
        except FrameError as e:
            logger.error("the consuming connection to RabbitMQ is out of step (%s); closing it", e)
            self.lose(str(e))
            return
        if deliveries:
            self._deliver(deliveries)
        for kind, number, raw in frames:
            if kind != 1:
                continue
            if raw[7:11] in _CONFIRMS:  # basic.ack / basic.nack of a publish: many, cheap
                channel = self.channels.get(number)
                if channel is not None and channel.on_confirm is not None:
                    tag, bits = _CONFIRM.unpack_from(raw, 11)
                    channel.on_confirm(tag, bool(bits & 1), raw[10] == 80)
                continue
            self._method(number, frame.unmarshal(raw)[2])

    def _deliver(self, deliveries: list[Delivered]) -> None:
        """Each channel's run of deliveries to its callback, as one list."""
        channels = self.channels
        if any(d[1] == 0 for d in deliveries):  # returned publishes (delivery tag 0)
            for d in deliveries:
                channel = channels.get(d[0]) if d[1] == 0 else None
                if channel is not None and channel.on_return is not None:
                    channel.on_return(d)
            deliveries = [d for d in deliveries if d[1] != 0]
            if not deliveries:
                return
        number = deliveries[0][0]
        runs: dict[int, list[Delivered]] = {number: deliveries}
        for i, d in enumerate(deliveries):
            if d[0] != number:  # more than one channel in this read: split them
                runs = {number: deliveries[:i]}
                for d in deliveries[i:]:
                    runs.setdefault(d[0], []).append(d)
                break
        for number, run in runs.items():
            channel = channels.get(number)
            if channel is not None and channel.on_deliveries is not None:
                channel.on_deliveries(run)

    def _method(self, number: int, value: Any) -> None:
        if isinstance(value, commands.Connection.Close):
            self.write(frame.marshal(commands.Connection.CloseOk(), 0))
            self.lose(f"RabbitMQ closed the connection: {value.reply_code} {value.reply_text}")
            return
        if isinstance(value, commands.Connection.Blocked | commands.Connection.Unblocked):
            return  # about publishing, which this connection does not do
        channel = self._control if number == 0 else self.channels.get(number)
        if channel is None:
            return
        if isinstance(value, commands.Channel.Close):
            self.write(frame.marshal(commands.Channel.CloseOk(), number))
            logger.warning(
                "RabbitMQ closed consuming channel %d: %s %s",
                number,
                value.reply_code,
                value.reply_text,
            )
            channel.closed(f"{value.reply_code} {value.reply_text}")
        elif isinstance(value, commands.Basic.Cancel):  # the queue was deleted, or similar
            channel.consumers.discard(value.consumer_tag)
        elif isinstance(value, commands.Channel.Flow):
            self.write(frame.marshal(commands.Channel.FlowOk(active=value.active), number))
        else:
            channel.answered(value)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lose(f"connection lost ({type(exc).__name__}: {exc})" if exc else "connection closed")

    def timer(self, seconds: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        """``callback`` in ``seconds`` on the connection's loop (looked up once)."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        return self.loop.call_later(seconds, callback)

    # -- writing and closing ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.is_closed or self.transport is None:
            raise ChannelClosed(f"the consuming connection is closed ({self.closed_because})")
        self.transport.write(data)

    def lose(self, because: str) -> None:
        """It is gone (or must go): every channel closed, ``on_lost`` told, once."""
        if self.is_closed:
            return
        self.is_closed, self.closed_because = True, because
        for channel in [self._control, *self.channels.values()]:
            channel.closed(because)
        if self.transport is not None:
            self.transport.abort()
        if self._beats is not None:
            self._beats.cancel()
        if self.on_lost is not None:
            self.on_lost()

    def abort(self) -> None:
        self.on_lost = None
        self.lose("aborted")

    async def close(self) -> None:
        """Close it politely (connection.close, close-ok), or abort it after a second."""
        if self.is_closed:
            return
        self.on_lost = None
        with contextlib.suppress(ConnectionError):
            for channel in list(self.channels.values()):
                channel.flush_acks()
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(1.0):
                await self._control.rpc(
                    commands.Connection.Close(200, "", 0, 0), commands.Connection.CloseOk
                )
        self.lose("closed by us")


def _ssl_context(query: dict[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=query.get("cafile"))
    if "certfile" in query:
        context.load_cert_chain(query["certfile"], query.get("keyfile"))
    if query.get("no_verify_ssl", "0") not in ("0", "", "false"):
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
