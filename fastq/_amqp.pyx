# cython: boundscheck=False, wraparound=False, cdivision=True
"""AMQP 0-9-1 frames off a consuming connection's byte stream, in C.

Each ``basic.deliver`` with its content header and body frames becomes one delivery tuple; every
other frame is handed back whole, for pamqp to decode. It moves bytes and decides nothing: what
a frame means to the connection is fastq.broker.amqp.stream's business. fastq/_amqp_py.py is the
slow, obvious twin; any difference between them is a bug here.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

import datetime
import decimal

from fastq.errors import FrameError

__all__ = ["FRAME_HEARTBEAT", "FRAME_METHOD", "FrameReader", "decode_table"]

FRAME_METHOD = 1
FRAME_HEARTBEAT = 8

cdef enum:
    _METHOD = 1
    _HEADER = 2
    _BODY = 3
    _END = 0xCE
    _DELIVER = (60 << 16) | 60
    _RETURN = (60 << 16) | 50
    _MAX_DEPTH = 32

cdef object _UTC = datetime.UTC
cdef object _fromtimestamp = datetime.datetime.fromtimestamp
cdef object _Decimal = decimal.Decimal


cdef struct Cursor:
    const uint8_t* p
    const uint8_t* end
    const uint8_t* base


cdef inline uint16_t _u16(const uint8_t* p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline uint32_t _u32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _u64(const uint8_t* p) noexcept nogil:
    return (<uint64_t>_u32(p) << 32) | _u32(p + 4)


cdef const uint8_t* _take(Cursor* c, Py_ssize_t n, str what) except NULL:
    cdef const uint8_t* at = c.p
    if n < 0 or n > c.end - c.p:
        raise FrameError(
            f"AMQP {what} is cut short: {n} more bytes expected at offset "
            f"{c.p - c.base}, {c.end - c.p} left in the frame"
        )
    c.p += n
    return at


cdef str _short_str(Cursor* c, str what):
    cdef Py_ssize_t n = _take(c, 1, what)[0]
    cdef const uint8_t* at = _take(c, n, what)
    return (<const char*>at)[:n].decode("utf-8", "replace")


cdef bytes _long_bytes(Cursor* c, str what):
    cdef Py_ssize_t n = _u32(_take(c, 4, what))
    cdef const uint8_t* at = _take(c, n, what)
    return PyBytes_FromStringAndSize(<const char*>at, n)


cdef object _value(Cursor* c, int depth, str what):
    cdef uint8_t kind = _take(c, 1, what)[0]
    cdef const uint8_t* p
    cdef uint64_t bits
    cdef double f64
    cdef float f32
    cdef uint32_t b32
    if kind == b"t":
        return _take(c, 1, what)[0] != 0
    if kind == b"b":
        return <int8_t>_take(c, 1, what)[0]
    if kind == b"B":
        return _take(c, 1, what)[0]
    if kind == b"s":
        return <int16_t>_u16(_take(c, 2, what))
    if kind == b"u":
        return _u16(_take(c, 2, what))
    if kind == b"I":
        return <int32_t>_u32(_take(c, 4, what))
    if kind == b"i":
        return _u32(_take(c, 4, what))
    if kind == b"l" or kind == b"L":
        return <int64_t>_u64(_take(c, 8, what))
    if kind == b"f":
        b32 = _u32(_take(c, 4, what))
        memcpy(&f32, &b32, 4)
        return f32
    if kind == b"d":
        bits = _u64(_take(c, 8, what))
        memcpy(&f64, &bits, 8)
        return f64
    if kind == b"D":
        p = _take(c, 5, what)
        return _Decimal(_u32(p + 1)) * (_Decimal(10) ** -(<int>p[0]))
    if kind == b"S":
        raw = _long_bytes(c, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw
    if kind == b"A":
        return _array(c, depth + 1, what)
    if kind == b"T":
        bits = _u64(_take(c, 8, what))
        try:
            if bits > 0xFFFFFFFF:  # milliseconds, as pamqp reads them
                return _fromtimestamp(bits / 1000.0, tz=_UTC)
            return _fromtimestamp(bits, tz=_UTC)
        except (OverflowError, ValueError, OSError) as e:
            raise FrameError(f"AMQP timestamp {bits} in the {what} is out of range") from e
    if kind == b"F":
        return _table(c, depth + 1, what)
    if kind == b"V" or kind == 0:
        return None
    if kind == b"x":
        return bytearray(_long_bytes(c, what))
    raise FrameError(
        f"AMQP field of unknown type {bytes([kind])!r} at offset {c.p - c.base - 1} of the "
        f"{what}; expected one of tbBsuIilLfdDSATFVx"
    )


cdef Cursor _nested(Cursor* c, int depth, str what) except *:
    cdef Cursor inner
    if depth > _MAX_DEPTH:
        raise FrameError(f"AMQP field tables nested deeper than {_MAX_DEPTH} in the {what}")
    cdef Py_ssize_t n = _u32(_take(c, 4, what))
    inner.p = _take(c, n, what)
    inner.end = inner.p + n
    inner.base = c.base
    return inner


cdef dict _table(Cursor* c, int depth, str what):
    cdef Cursor inner = _nested(c, depth, what)
    cdef dict out = {}
    while inner.p < inner.end:
        key = _short_str(&inner, what)
        out[key] = _value(&inner, depth, what)
    return out


cdef list _array(Cursor* c, int depth, str what):
    cdef Cursor inner = _nested(c, depth, what)
    cdef list out = []
    while inner.p < inner.end:
        out.append(_value(&inner, depth, what))
    return out


def decode_table(data):
    """A field table (its 4-byte length first), decoded as pamqp decodes one."""
    cdef bytes raw = bytes(data)
    cdef Cursor c
    c.base = c.p = <const uint8_t*>PyBytes_AS_STRING(raw)
    c.end = c.p + PyBytes_GET_SIZE(raw)
    return _table(&c, 0, "field table")


cdef class _Content:
    """A ``basic.deliver`` whose header or body is still to come."""

    cdef str consumer_tag, message_id, reply_to, correlation_id, content_type
    cdef object headers
    cdef uint64_t delivery_tag
    cdef bint redelivered
    cdef int64_t size   # -1: no header yet
    cdef bytearray body


cdef class FrameReader:
    """Frames of one AMQP connection, from the bytes as they come (``feed``).

    Parameters:
        frame_max: the largest frame the connection allows (``connection.tune``), header and
            end byte included; a bigger one is a FrameError.
    """

    cdef public Py_ssize_t frame_max
    cdef public uint64_t delivered
    cdef bytes _rest
    cdef dict _content

    def __init__(self, frame_max=131072):
        self.frame_max = frame_max
        self._rest = b""
        self._content = {}
        self.delivered = 0

    @property
    def buffered(self):
        """Bytes of a frame not complete yet."""
        return PyBytes_GET_SIZE(self._rest)

    def feed(self, data):
        """Take ``data`` (any split of the stream) and return what it completed: the deliveries,
        in order, and every other frame as ``(type, channel, the whole frame)``, in order.

        Raises:
            FrameError: bytes that are not a frame where one was due (the stream is out of step:
                the connection must be closed), or a content frame out of turn.
        """
        cdef bytes buf = self._rest + bytes(data) if self._rest else bytes(data)
        cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(buf)
        cdef Py_ssize_t pos = 0, end = PyBytes_GET_SIZE(buf), size
        cdef uint8_t kind
        cdef uint16_t channel
        cdef list deliveries = [], frames = []
        while end - pos >= 7:
            kind = base[pos]
            channel = _u16(base + pos + 1)
            size = _u32(base + pos + 3)
            if size + 8 > self.frame_max:
                raise FrameError(
                    f"AMQP frame of {size + 8} bytes on channel {channel} exceeds the "
                    f"negotiated frame_max of {self.frame_max} bytes"
                )
            if end - pos < size + 8:
                break
            if base[pos + 7 + size] != _END:
                raise FrameError(
                    f"AMQP frame on channel {channel} ends with 0x{base[pos + 7 + size]:02x}, "
                    "expected 0xce: the stream is out of step"
                )
            self._frame(kind, channel, buf, pos + 7, pos + 7 + size, deliveries, frames)
            pos += size + 8
        self._rest = buf[pos:] if pos < end else b""
        return deliveries, frames

    cdef int _frame(
        self, uint8_t kind, uint16_t channel, bytes buf, Py_ssize_t start, Py_ssize_t stop,
        list deliveries, list frames,
    ) except -1:
        cdef const uint8_t* base = <const uint8_t*>PyBytes_AS_STRING(buf)
        cdef Cursor c
        cdef _Content content = self._content.get(channel)
        cdef Py_ssize_t n
        cdef uint32_t method
        cdef uint16_t code
        c.base = base
        c.p = base + start
        c.end = base + stop
        if kind == _METHOD:
            if content is not None:
                raise FrameError(
                    f"AMQP method frame on channel {channel} while a delivery's "
                    f"{'body' if content.size >= 0 else 'content header'} was due"
                )
            what = "method frame"
            method = _u32(_take(&c, 4, what))
            if method == _DELIVER:
                content = _Content.__new__(_Content)
                content.consumer_tag = _short_str(&c, what)
                content.delivery_tag = _u64(_take(&c, 8, what))
                content.redelivered = _take(&c, 1, what)[0] & 1
                content.size = -1
                self._content[channel] = content
            elif method == _RETURN:  # a mandatory publish no queue took: delivery_tag 0
                content = _Content.__new__(_Content)
                code = _u16(_take(&c, 2, what))
                content.consumer_tag = f"{code} {_short_str(&c, what)}"
                content.delivery_tag = 0
                content.redelivered = False
                content.size = -1
                self._content[channel] = content
            else:
                frames.append((kind, channel, buf[start - 7 : stop + 1]))
        elif kind == _HEADER:
            if content is None or content.size >= 0:
                raise FrameError(
                    f"AMQP content header on channel {channel} without a basic.deliver before it"
                )
            self._header(content, &c)
            if content.size == 0:
                content.body = bytearray()
                self._done(channel, content, b"", deliveries)
        elif kind == _BODY:
            if content is None or content.size < 0:
                raise FrameError(
                    f"AMQP body frame on channel {channel} without a content header before it"
                )
            n = stop - start
            if content.body is None and n == content.size:  # the whole body in one frame
                self._done(channel, content, buf[start:stop], deliveries)
                return 0
            if content.body is None:
                content.body = bytearray()
            content.body += buf[start:stop]
            if len(content.body) > content.size:
                raise FrameError(
                    f"AMQP body on channel {channel} runs past its announced {content.size} bytes"
                )
            if len(content.body) == content.size:
                self._done(channel, content, bytes(content.body), deliveries)
        else:  # heartbeats, and what the connection decides about
            frames.append((kind, channel, buf[start - 7 : stop + 1]))
        return 0

    cdef int _header(self, _Content content, Cursor* c) except -1:
        what = "content header"
        _take(c, 4, what)  # class id, weight
        content.size = <int64_t>_u64(_take(c, 8, what))
        if content.size < 0:
            raise FrameError(f"AMQP content header announces a body of {content.size} bytes")
        cdef uint16_t flags = _u16(_take(c, 2, what)), word = flags
        cdef int bit
        while word & 1:  # a continuation word: properties AMQP 0-9-1 does not define
            word = _u16(_take(c, 2, what))
        content.message_id = content.reply_to = content.correlation_id = ""
        content.content_type = ""
        content.headers = None
        for bit in range(15, 1, -1):
            if not flags & (1 << bit):
                continue
            if bit == 13:
                content.headers = _table(c, 0, what)
            elif bit == 12 or bit == 11:
                _take(c, 1, what)
            elif bit == 6:
                _take(c, 8, what)
            elif bit == 15:
                content.content_type = _short_str(c, what)
            elif bit == 10:
                content.correlation_id = _short_str(c, what)
            elif bit == 9:
                content.reply_to = _short_str(c, what)
            elif bit == 7:
                content.message_id = _short_str(c, what)
            else:
                _short_str(c, what)
        return 0

    cdef int _done(self, uint16_t channel, _Content content, bytes body, list deliveries) except -1:
        del self._content[channel]
        deliveries.append(
            (
                channel,
                content.delivery_tag,
                content.redelivered,
                content.consumer_tag,
                content.message_id,
                content.reply_to,
                content.correlation_id,
                content.content_type,
                content.headers,
                body,
            )
        )
        self.delivered += 1
        return 0
