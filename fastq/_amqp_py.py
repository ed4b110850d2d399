"""Reference implementation of fastq._amqp: slow and obvious on purpose.

Any behavioural difference from this module is a bug in _amqp.pyx (tests/unit/test_amqp_frames.py
runs both on the same bytes, split at every place). It reads AMQP 0-9-1 frames off a consuming
connection's byte stream: each ``basic.deliver`` with its content header and body frames becomes
one delivery tuple; every other frame is handed back whole, for pamqp to decode. It decides
nothing: what a frame means to the connection is fastq.broker.amqp.stream's business.
"""

from __future__ import annotations

import datetime
import decimal
import struct
from typing import Any

from fastq.errors import FrameError

__all__ = ["FRAME_HEARTBEAT", "FRAME_METHOD", "FrameReader", "decode_table"]

FRAME_METHOD, FRAME_HEADER, FRAME_BODY, FRAME_HEARTBEAT = 1, 2, 3, 8
FRAME_END = 0xCE
#: basic.deliver and basic.return (class 60, methods 60 and 50): each carries content
BASIC_DELIVER, BASIC_RETURN = (60 << 16) | 60, (60 << 16) | 50
#: (channel, delivery_tag, redelivered, consumer_tag, message_id, reply_to, correlation_id,
#: content_type, headers, body); a message RabbitMQ returned (basic.return, a mandatory publish
#: no queue took) has delivery_tag 0 and its reply code and text where the consumer tag goes
Delivered = tuple[int, int, bool, str, str, str, str, str, "dict[str, Any] | None", bytes]


class _Cursor:
    __slots__ = ("data", "end", "pos", "what")

    def __init__(self, data: bytes, pos: int, end: int, what: str) -> None:
        self.data, self.pos, self.end, self.what = data, pos, end, what

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.end:
            raise FrameError(
                f"AMQP {self.what} is cut short: {n} more bytes expected at offset "
                f"{self.pos}, {self.end - self.pos} left in the frame"
            )
        at = self.pos
        self.pos += n
        return at

    def unpack(self, fmt: struct.Struct) -> Any:
        return fmt.unpack_from(self.data, self.take(fmt.size))[0]

    def short_str(self) -> str:
        n = self.data[self.take(1)]
        at = self.take(n)
        return self.data[at : at + n].decode("utf-8", "replace")

    def long_bytes(self) -> bytes:
        n = self.unpack(_U32)
        at = self.take(n)
        return self.data[at : at + n]


_U8, _I8 = struct.Struct(">B"), struct.Struct(">b")
_U16, _I16 = struct.Struct(">H"), struct.Struct(">h")
_U32, _I32 = struct.Struct(">I"), struct.Struct(">i")
_U64, _I64 = struct.Struct(">Q"), struct.Struct(">q")
_F32, _F64 = struct.Struct(">f"), struct.Struct(">d")
_FRAME_HEAD = struct.Struct(">BHI")
#: property flags of the content header, highest bit first
_SHORT_STRS = {15, 14, 10, 9, 8, 7, 5, 4, 3, 2}
_MAX_DEPTH = 32


#: the fixed-size field types: their struct
_FIXED = {
    ord("b"): _I8,
    ord("B"): _U8,
    ord("s"): _I16,
    ord("u"): _U16,
    ord("I"): _I32,
    ord("i"): _U32,
    ord("l"): _I64,
    ord("L"): _I64,
    ord("f"): _F32,
    ord("d"): _F64,
}


def _value(c: _Cursor, depth: int) -> Any:
    kind = c.data[c.take(1)]
    if kind == 0x74:  # t
        return bool(c.data[c.take(1)])
    fixed = _FIXED.get(kind)
    if fixed is not None:
        return c.unpack(fixed)
    if kind == 0x44:  # D
        scale = c.unpack(_U8)
        return decimal.Decimal(c.unpack(_U32)) * (decimal.Decimal(10) ** -scale)
    if kind == 0x53:  # S
        raw = c.long_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    if kind == 0x41:  # A
        return _array(c, depth + 1)
    if kind == 0x54:  # T
        bits = c.unpack(_U64)
        seconds = bits / 1000.0 if bits > 0xFFFFFFFF else bits  # milliseconds, as pamqp reads them
        try:
            return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)
        except (OverflowError, ValueError, OSError) as e:
            raise FrameError(f"AMQP timestamp {bits} in the {c.what} is out of range") from e
    if kind == 0x46:  # F
        return _table(c, depth + 1)
    if kind in (0x56, 0x00):  # V
        return None
    if kind == 0x78:  # x
        return bytearray(c.long_bytes())
    raise FrameError(
        f"AMQP field of unknown type {bytes([kind])!r} at offset {c.pos - 1} of the {c.what}; "
        "expected one of tbBsuIilLfdDSATFVx"
    )


def _nested(c: _Cursor, depth: int) -> _Cursor:
    if depth > _MAX_DEPTH:
        raise FrameError(f"AMQP field tables nested deeper than {_MAX_DEPTH} in the {c.what}")
    n = c.unpack(_U32)
    at = c.take(n)
    return _Cursor(c.data, at, at + n, c.what)


def _table(c: _Cursor, depth: int) -> dict[str, Any]:
    inner = _nested(c, depth)
    out: dict[str, Any] = {}
    while inner.pos < inner.end:
        key = inner.short_str()
        out[key] = _value(inner, depth)
    return out


def _array(c: _Cursor, depth: int) -> list[Any]:
    inner = _nested(c, depth)
    out = []
    while inner.pos < inner.end:
        out.append(_value(inner, depth))
    return out


def decode_table(data: bytes) -> dict[str, Any]:
    """A field table (its 4-byte length first), decoded as pamqp decodes one."""
    return _table(_Cursor(bytes(data), 0, len(data), "field table"), 0)


class _Content:
    """A ``basic.deliver`` whose header or body is still to come."""

    __slots__ = ("body", "consumer_tag", "delivery_tag", "props", "redelivered", "size")

    def __init__(self, consumer_tag: str, delivery_tag: int, redelivered: bool) -> None:
        self.consumer_tag, self.delivery_tag, self.redelivered = (
            consumer_tag,
            delivery_tag,
            redelivered,
        )
        self.size = -1  # no header yet
        self.props: tuple[str, str, str, str, dict[str, Any] | None] = ("", "", "", "", None)
        self.body = bytearray()


class FrameReader:
    """Frames of one AMQP connection, from the bytes as they come (``feed``).

    Parameters:
        frame_max: the largest frame the connection allows (``connection.tune``), header and
            end byte included; a bigger one is a FrameError.
    """

    def __init__(self, frame_max: int = 131072) -> None:
        self.frame_max = frame_max
        self._rest = b""
        self._content: dict[int, _Content] = {}
        #: deliveries completed since the start
        self.delivered = 0

    @property
    def buffered(self) -> int:
        """Bytes of a frame not complete yet."""
        return len(self._rest)

    def feed(self, data: bytes) -> tuple[list[Delivered], list[tuple[int, int, bytes]]]:
        """Take ``data`` (any split of the stream) and return what it completed: the deliveries,
        in order, and every other frame as ``(type, channel, the whole frame)``, in order.

        Raises:
            FrameError: bytes that are not a frame where one was due (the stream is out of step:
                the connection must be closed), or a content frame out of turn.
        """
        buf = self._rest + bytes(data) if self._rest else bytes(data)
        pos, end = 0, len(buf)
        deliveries: list[Delivered] = []
        frames: list[tuple[int, int, bytes]] = []
        while end - pos >= 7:
            kind, channel, size = _FRAME_HEAD.unpack_from(buf, pos)
            if size + 8 > self.frame_max:
                raise FrameError(
                    f"AMQP frame of {size + 8} bytes on channel {channel} exceeds the "
                    f"negotiated frame_max of {self.frame_max} bytes"
                )
            if end - pos < size + 8:
                break
            if buf[pos + 7 + size] != FRAME_END:
                raise FrameError(
                    f"AMQP frame on channel {channel} ends with 0x{buf[pos + 7 + size]:02x}, "
                    "expected 0xce: the stream is out of step"
                )
            start = pos + 7
            self._frame(kind, channel, buf, start, start + size, deliveries, frames)
            pos = start + size + 1
        self._rest = buf[pos:]
        return deliveries, frames

    def _frame(
        self,
        kind: int,
        channel: int,
        buf: bytes,
        start: int,
        end: int,
        deliveries: list[Delivered],
        frames: list[tuple[int, int, bytes]],
    ) -> None:
        content = self._content.get(channel)
        if kind == FRAME_METHOD:
            if content is not None:
                raise FrameError(
                    f"AMQP method frame on channel {channel} while a delivery's "
                    f"{'body' if content.size >= 0 else 'content header'} was due"
                )
            c = _Cursor(buf, start, end, "method frame")
            method = c.unpack(_U32)
            if method == BASIC_DELIVER:
                tag = c.short_str()
                delivery_tag = c.unpack(_U64)
                self._content[channel] = _Content(tag, delivery_tag, bool(c.unpack(_U8) & 1))
            elif method == BASIC_RETURN:
                code = c.unpack(_U16)
                self._content[channel] = _Content(f"{code} {c.short_str()}", 0, False)
            else:
                frames.append((kind, channel, buf[start - 7 : end + 1]))
        elif kind == FRAME_HEADER:
            if content is None or content.size >= 0:
                raise FrameError(
                    f"AMQP content header on channel {channel} without a basic.deliver before it"
                )
            self._header(content, _Cursor(buf, start, end, "content header"))
            if content.size == 0:
                self._done(channel, content, deliveries)
        elif kind == FRAME_BODY:
            if content is None or content.size < 0:
                raise FrameError(
                    f"AMQP body frame on channel {channel} without a content header before it"
                )
            content.body += buf[start:end]
            if len(content.body) > content.size:
                raise FrameError(
                    f"AMQP body on channel {channel} runs past its announced {content.size} bytes"
                )
            if len(content.body) == content.size:
                self._done(channel, content, deliveries)
        else:  # heartbeats, and what the connection decides about
            frames.append((kind, channel, buf[start - 7 : end + 1]))

    def _header(self, content: _Content, c: _Cursor) -> None:
        c.take(4)  # class id, weight
        content.size = c.unpack(_I64)
        if content.size < 0:
            raise FrameError(f"AMQP content header announces a body of {content.size} bytes")
        flags = c.unpack(_U16)
        word = flags
        while word & 1:  # a continuation word: properties AMQP 0-9-1 does not define
            word = c.unpack(_U16)
        strings: dict[int, str] = {}
        headers = None
        for bit in range(15, 1, -1):
            if not flags & (1 << bit):
                continue
            if bit in _SHORT_STRS:
                strings[bit] = c.short_str()
            elif bit == 13:
                headers = _table(c, 0)
            elif bit in (12, 11):
                c.take(1)
            else:  # 6: timestamp
                c.take(8)
        content.props = (
            strings.get(7, ""),
            strings.get(9, ""),
            strings.get(10, ""),
            strings.get(15, ""),
            headers,
        )

    def _done(self, channel: int, content: _Content, deliveries: list[Delivered]) -> None:
        del self._content[channel]
        message_id, reply_to, correlation_id, content_type, headers = content.props
        deliveries.append(
            (
                channel,
                content.delivery_tag,
                content.redelivered,
                content.consumer_tag,
                message_id,
                reply_to,
                correlation_id,
                content_type,
                headers,
                bytes(content.body),
            )
        )
        self.delivered += 1
