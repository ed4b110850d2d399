"""Confirmed publishing without aiormq: one channel in confirm mode on the consuming connection
(fastq.broker.amqp.stream). A batch of messages is encoded here into its frames (``basic.publish``,
content header, body) and written at once; RabbitMQ's ``basic.ack`` (``multiple``, as it
coalesces them) resolves each publish's future, a ``basic.nack`` fails it, and a mandatory
publish that no queue took (``basic.return``, which comes before its ack) fails it with
``Unroutable``. The connection going fails every publish still waiting: the caller publishes
those again (at-least-once).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from typing import Any

from pamqp import commands
from pamqp import encode as pamqp_encode

from fastq.broker.amqp.stream import ChannelClosed, Delivered, Stream, StreamChannel

_FRAME = struct.Struct(">BHI")
_PUBLISH = struct.Struct(">HHH")  # class, method, reserved
_HEADER = struct.Struct(">HHQH")  # class, weight, body size, property flags
_END = b"\xce"
#: property flags of the content header
_CONTENT_TYPE, _HEADERS, _DELIVERY_MODE = 1 << 15, 1 << 13, 1 << 12
_CORRELATION_ID, _REPLY_TO, _MESSAGE_ID = 1 << 10, 1 << 9, 1 << 7


class Nacked(Exception):
    """RabbitMQ answered a publish with basic.nack."""


class Unroutable(Exception):
    """RabbitMQ returned a mandatory publish: declared again, it is published again."""


def _short(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 255:
        raise ValueError(f"an AMQP short string holds 255 bytes at most; got {len(raw)}: {text!r}")
    return bytes((len(raw),)) + raw


def publish_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    frame_max: int,
    mandatory: bool = True,
    message_id: str = "",
    content_type: str = "",
    headers: dict[str, Any] | None = None,
    reply_to: str = "",
    correlation_id: str = "",
) -> bytes:
    """The frames of one persistent publish (delivery_mode 2)."""
    method = (
        _PUBLISH.pack(60, 40, 0)
        + _short(exchange)
        + _short(routing_key)
        + (b"\x01" if mandatory else b"\x00")
    )
    flags, props = _DELIVERY_MODE, []
    if content_type:
        flags |= _CONTENT_TYPE
        props.append(_short(content_type))
    if headers:
        flags |= _HEADERS
        props.append(pamqp_encode.field_table(headers))
    props.append(b"\x02")  # delivery_mode: persistent
    for flag, value in (
        (_CORRELATION_ID, correlation_id),
        (_REPLY_TO, reply_to),
        (_MESSAGE_ID, message_id),
    ):
        if value:
            flags |= flag
            props.append(_short(value))
    header = _HEADER.pack(60, 0, len(body), flags) + b"".join(props)
    out = [
        _FRAME.pack(1, channel, len(method)),
        method,
        _END,
        _FRAME.pack(2, channel, len(header)),
        header,
        _END,
    ]
    step = frame_max - 8
    for at in range(0, len(body), step):
        piece = body[at : at + step]
        out += (_FRAME.pack(3, channel, len(piece)), piece, _END)
    return b"".join(out)


class Outbox:
    """The confirm-mode channel: ``publish`` writes a batch and waits for its confirms."""

    def __init__(self, channel: StreamChannel) -> None:
        self.channel = channel
        self.seq = 0
        #: publish sequence number -> (its future, its message id), oldest first
        self.waiting: dict[int, tuple[asyncio.Future[None], str]] = {}
        #: returned (no queue took them) and not confirmed yet: message id -> RabbitMQ's reply
        self.returned: dict[str, str] = {}
        channel.on_confirm = self.confirmed
        channel.on_return = self.came_back
        channel.on_closed.append(self.lost)

    @classmethod
    async def open(cls, stream: Stream) -> Outbox:
        channel = await stream.channel()
        await channel.rpc(commands.Confirm.Select(), commands.Confirm.SelectOk)
        return cls(channel)

    @property
    def frame_max(self) -> int:
        return self.channel.stream.reader.frame_max

    def publish(self, frames: Sequence[tuple[bytes, str]]) -> list[asyncio.Future[None]]:
        """Write each ``(frames, message id)`` in one write; a future per publish, resolved
        by its confirm."""
        loop = asyncio.get_running_loop()
        if self.channel.is_closed:  # a frame on a closed channel would cost the connection
            raise ChannelClosed(f"the publishing channel is closed ({self.channel.closed_because})")
        self.channel.stream.write(b"".join(f for f, _ in frames))  # raises if it is gone
        futures = []  # confirms arrive through the loop, after this returns
        for _, message_id in frames:
            self.seq += 1
            future: asyncio.Future[None] = loop.create_future()
            self.waiting[self.seq] = (future, message_id)
            futures.append(future)
        return futures

    def confirmed(self, tag: int, multiple: bool, ack: bool) -> None:
        """basic.ack or basic.nack for ``tag`` (and every one before it, with ``multiple``)."""
        tags = [t for t in self.waiting if t <= tag] if multiple else [tag]
        for t in tags:
            entry = self.waiting.pop(t, None)
            if entry is None:
                continue
            future, message_id = entry
            reply = self.returned.pop(message_id, None)
            if future.done():
                continue
            if not ack:
                future.set_exception(Nacked(f"RabbitMQ did not confirm message {message_id!r}"))
            elif reply is not None:
                future.set_exception(Unroutable(f"no queue took message {message_id!r} ({reply})"))
            else:
                future.set_result(None)

    def came_back(self, returned: Delivered) -> None:
        self.returned[returned[4]] = returned[3]

    def lost(self, because: str) -> None:
        waiting, self.waiting = self.waiting, {}
        for future, message_id in waiting.values():
            if not future.done():
                future.set_exception(
                    ChannelClosed(f"message {message_id!r} not confirmed: {because}")
                )
