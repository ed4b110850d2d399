"""fastq._amqp and its twin read the same AMQP frames the same way: deliveries built by pamqp (the
library aiormq writes and reads frames with), split at every byte, and garbage refused."""

from __future__ import annotations

import datetime
import decimal
import importlib
import random
from types import ModuleType
from typing import Any

import pytest
from pamqp import body, commands, frame, header, heartbeat
from pamqp import encode as pamqp_encode

from fastq.errors import FrameError


@pytest.fixture(params=["cython", "python"])
def amqp(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module("fastq._amqp" if request.param == "cython" else "fastq._amqp_py")


HEADERS = {
    "x-fastq-retries": 2,
    "x-delivery-count": 3,
    "s": "text",
    "raw": bytearray(b"\xff\xfe"),  # a byte array (x)
    "t": True,
    "d": 1.5,
    "neg": -7,
    "big": 2**40,
    "nested": {"a": [1, "two", {"b": None}]},
    "when": datetime.datetime(2026, 12, 3, 12, 0, tzinfo=datetime.UTC),
    "dec": decimal.Decimal("1.25"),
}


def delivery(
    channel: int,
    tag: int,
    payload: bytes,
    *,
    frame_max: int = 131072,
    headers: dict[str, object] | None = None,
    redelivered: bool = False,
) -> bytes:
    props = commands.Basic.Properties(
        content_type="application/msgpack",
        delivery_mode=2,
        priority=3,
        message_id=f"id-{tag}",
        reply_to="amq.rabbitmq.reply-to.x",
        correlation_id=f"c{tag}",
        timestamp=datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC),
        app_id="app",
        headers=headers,
    )
    out = frame.marshal(
        commands.Basic.Deliver("ctag-1", tag, redelivered, "ex", "rk"), channel
    ) + frame.marshal(header.ContentHeader(0, len(payload), props), channel)
    step = frame_max - 8
    for i in range(0, len(payload), step):
        out += frame.marshal(body.ContentBody(payload[i : i + step]), channel)
    return out


def expected(channel: int, tag: int, payload: bytes, headers=None, redelivered=False):
    return (
        channel,
        tag,
        redelivered,
        "ctag-1",
        f"id-{tag}",
        "amq.rabbitmq.reply-to.x",
        f"c{tag}",
        "application/msgpack",
        headers,
        payload,
    )


def test_deliveries_and_other_frames_in_order(amqp):
    other = frame.marshal(commands.Basic.ConsumeOk("ctag-2"), 5)
    beat = frame.marshal(heartbeat.Heartbeat(), 0)
    stream = (
        delivery(1, 1, b"one")
        + other
        + delivery(2, 7, b"", headers=HEADERS, redelivered=True)
        + beat
        + delivery(1, 2, b"x" * 300_000)  # three body frames
    )
    deliveries, frames = amqp.FrameReader().feed(stream)
    assert deliveries == [
        expected(1, 1, b"one"),
        expected(2, 7, b"", HEADERS, True),
        expected(1, 2, b"x" * 300_000),
    ]
    assert frames == [(1, 5, other), (8, 0, beat)]
    assert frame.unmarshal(frames[0][2])[2].consumer_tag == "ctag-2"


def test_any_split_gives_the_same(amqp):
    rng = random.Random(7)
    messages = [(1 + i % 3, i + 1, rng.randbytes(rng.randrange(0, 400))) for i in range(40)]
    stream = b"".join(
        delivery(ch, tag, p, frame_max=256, headers={"n": tag}) for ch, tag, p in messages
    )
    want = [expected(ch, tag, p, {"n": tag}) for ch, tag, p in messages]
    for size in (1, 2, 7, 13, 64, 1000):
        reader = amqp.FrameReader(frame_max=256)
        got = []
        for i in range(0, len(stream), size):
            got += reader.feed(stream[i : i + size])[0]
        assert got == want
        assert reader.buffered == 0 and reader.delivered == len(messages)


def test_field_tables_decode_as_pamqp_does(amqp):
    encoded = pamqp_encode.field_table(HEADERS)
    assert amqp.decode_table(encoded) == HEADERS
    from pamqp import decode

    assert amqp.decode_table(encoded) == decode.field_table(encoded)[1]


@pytest.mark.parametrize(
    ("garbage", "words"),
    [
        (b"\x01\x00\x01\x00\x00\x00\x04abcdX", "ends with 0x58, expected 0xce"),
        (b"\x03\x00\x01\x00\x00\x00\x01a\xce", "body frame on channel 1 without a content header"),
        (
            b"\x02\x00\x01\x00\x00\x00\x01a\xce",
            "content header on channel 1 without a basic.deliver",
        ),
        (b"\x01\x00\x01\x00\x10\x00\x00", "exceeds the negotiated frame_max of 131072"),
    ],
)
def test_garbage_is_refused_with_what_was_seen(amqp, garbage, words):
    with pytest.raises(FrameError, match=words.replace("(", r"\(")):
        amqp.FrameReader().feed(garbage)


def test_a_truncated_header_is_refused_not_read_past(amqp):
    good = delivery(1, 1, b"abc", headers={"k": "v"})
    deliver_len = len(frame.marshal(commands.Basic.Deliver("ctag-1", 1, False, "ex", "rk"), 1))
    head = bytearray(good[deliver_len:])
    size = int.from_bytes(head[3:7], "big")
    cut = (
        bytes(head[:3]) + (size - 20).to_bytes(4, "big") + bytes(head[7 : 7 + size - 20]) + b"\xce"
    )
    with pytest.raises(FrameError, match="cut short"):
        amqp.FrameReader().feed(good[:deliver_len] + cut)


def test_an_unknown_field_type_says_which(amqp):
    table = b"\x00\x00\x00\x03\x01kZ"
    with pytest.raises(FrameError, match=r"unknown type b'Z'"):
        amqp.decode_table(table)


def test_random_garbage_is_a_frame_error_or_reads(amqp):
    rng = random.Random(11)
    good = delivery(1, 1, b"payload", headers=HEADERS)
    for _ in range(2000):
        data = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            amqp.FrameReader().feed(bytes(data))
        except FrameError:
            pass


def test_a_read_of_several_channels_reaches_each_channel_alone():
    from fastq.broker.amqp.stream import Stream, StreamChannel

    stream = Stream()
    got: dict[int, list[int]] = {}
    for number in (1, 2):
        channel = stream.channels[number] = StreamChannel(stream, number)
        channel.on_deliveries = lambda run, n=number: got.setdefault(n, []).extend(
            d[1] for d in run
        )
    stream.data_received(delivery(1, 1, b"a") + delivery(2, 1, b"b") + delivery(1, 2, b"c"))
    assert got == {1: [1, 2], 2: [1]}


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True


def test_garbage_on_the_consuming_connection_closes_it_and_says_why():
    from fastq.broker.amqp.stream import Stream, StreamChannel

    lost: list[str] = []
    stream = Stream(on_lost=lambda: lost.append(stream.closed_because))
    stream.connection_made(_Transport())  # type: ignore[arg-type]
    channel = stream.channels[1] = StreamChannel(stream, 1)
    got: list[int] = []
    channel.on_deliveries = lambda run: got.extend(d[1] for d in run)
    stream.data_received(delivery(1, 1, b"fine") + b"\x01\x00\x01\x00\x00\x00\x04abcdX")
    assert got == []  # nothing of a read that is out of step is handed on
    assert stream.is_closed and channel.is_closed
    assert stream.transport.aborted  # type: ignore[union-attr]
    assert lost == [
        "AMQP frame on channel 1 ends with 0x58, expected 0xce: the stream is out of step"
    ]
    with pytest.raises(ConnectionError, match="consuming connection is closed"):
        channel.basic_ack(1)


def test_a_returned_message_reads_as_delivery_tag_0_with_the_reply(amqp):
    props = commands.Basic.Properties(message_id="m-1", delivery_mode=2)
    stream = (
        frame.marshal(commands.Basic.Return(312, "NO_ROUTE", "", "nowhere"), 1)
        + frame.marshal(header.ContentHeader(0, 4, props), 1)
        + frame.marshal(body.ContentBody(b"body"), 1)
        + frame.marshal(commands.Basic.Ack(7, False), 1)
    )
    deliveries, frames = amqp.FrameReader().feed(stream)
    assert deliveries == [(1, 0, False, "312 NO_ROUTE", "m-1", "", "", "", None, b"body")]
    assert [f[:2] for f in frames] == [(1, 1)]


def test_publish_frames_are_what_pamqp_reads():
    from fastq.broker.amqp.outbox import publish_frames

    payload = b"y" * 300
    data = publish_frames(
        3,
        "ex",
        "rk",
        payload,
        frame_max=128,
        message_id="m-9",
        content_type="application/msgpack",
        headers={"x-fastq-retries": 2, "k": "v"},
        reply_to="amq.rabbitmq.reply-to",
        correlation_id="m-9",
    )
    values = []
    while data:
        used, channel, value = frame.unmarshal(data)
        assert channel == 3
        values.append(value)
        data = data[used:]
    publish, head, *bodies = values
    assert (publish.exchange, publish.routing_key, publish.mandatory) == ("ex", "rk", True)
    props = head.properties
    assert (head.body_size, props.delivery_mode, props.message_id) == (300, 2, "m-9")
    assert (props.content_type, props.reply_to, props.correlation_id) == (
        "application/msgpack",
        "amq.rabbitmq.reply-to",
        "m-9",
    )
    assert props.headers == {"x-fastq-retries": 2, "k": "v"}
    assert b"".join(b.value for b in bodies) == payload and len(bodies) == 3  # 120 a frame


def test_the_outbox_resolves_each_publish_by_its_confirm():
    import asyncio

    from fastq.broker.amqp.outbox import Nacked, Outbox, Unroutable
    from fastq.broker.amqp.stream import ChannelClosed, Stream, StreamChannel

    async def run() -> None:
        stream = Stream()
        transport = _Transport()
        stream.connection_made(transport)  # type: ignore[arg-type]
        channel = stream.channels[1] = StreamChannel(stream, 1)
        outbox = Outbox(channel)
        futures = outbox.publish([(b"f%d" % i, f"m{i}") for i in range(1, 6)])
        assert transport.written == [b"f1f2f3f4f5"]  # one write for the batch
        props = commands.Basic.Properties(message_id="m4")
        stream.data_received(  # m4 came back (no queue took it), then the confirms
            frame.marshal(commands.Basic.Return(312, "NO_ROUTE", "", "q"), 1)
            + frame.marshal(header.ContentHeader(0, 0, props), 1)
            + frame.marshal(commands.Basic.Ack(2, True), 1)
            + frame.marshal(commands.Basic.Nack(3, False, False), 1)
            + frame.marshal(commands.Basic.Ack(4, False), 1)
        )
        assert [f.done() for f in futures] == [True, True, True, True, False]
        assert futures[0].result() is None and futures[1].result() is None
        with pytest.raises(Nacked):
            futures[2].result()
        with pytest.raises(Unroutable, match="312 NO_ROUTE"):
            futures[3].result()
        stream.lose("test: gone")  # what still waits fails, to be published again
        with pytest.raises(ChannelClosed, match="m5.*test: gone"):
            futures[4].result()

    asyncio.run(run())


def _acks(written: list[bytes]) -> list[tuple[int, int, int]]:
    """(method id, delivery tag, bits) of each ack / nack frame written, in order."""
    import struct

    out = []
    for data in written:
        while data:
            _, _, size, _, method, tag, bits = struct.unpack_from(">BHIHHQB", data)
            out.append((method, tag, bits))
            data = data[7 + size + 1 :]
    return out


def _coalescing(seconds: float, batch: int) -> tuple[_Transport, Any]:
    """A channel of a stream that writes to a list, holding acks ``seconds`` / ``batch``."""
    from fastq.broker.amqp.stream import Stream, StreamChannel

    stream = Stream()
    transport = _Transport()
    stream.connection_made(transport)  # type: ignore[arg-type]
    channel = stream.channels[1] = StreamChannel(stream, 1)
    channel.ack_seconds, channel.ack_batch = seconds, batch
    return transport, channel


def test_acks_wait_to_go_as_one_until_they_cover_the_batch():
    import asyncio

    async def run() -> list[tuple[int, int, int]]:
        transport, channel = _coalescing(60.0, 3)
        channel.basic_ack(1, multiple=True)
        channel.basic_ack(2, multiple=True)
        assert transport.written == []  # held: 2 of a batch of 3
        channel.basic_ack(3, multiple=True)
        channel.basic_ack(4, multiple=True)
        channel.basic_nack(6, requeue=True)  # the held ack goes first, in order
        return _acks(transport.written)

    assert asyncio.run(run()) == [(80, 3, 1), (80, 4, 1), (120, 6, 2)]


def test_a_held_ack_goes_after_ack_seconds_at_the_latest():
    import asyncio

    async def run() -> list[tuple[int, int, int]]:
        transport, channel = _coalescing(0.001, 100)
        channel.basic_ack(7, multiple=True)
        channel.basic_ack(9, multiple=True)
        while not transport.written:
            await asyncio.sleep(0.001)
        return _acks(transport.written)

    assert asyncio.run(run()) == [(80, 9, 1)]


def test_a_held_ack_of_a_channel_that_closed_is_dropped():
    import asyncio

    async def run() -> list[bytes]:
        transport, channel = _coalescing(0.001, 100)
        channel.basic_ack(5, multiple=True)
        channel.closed("test: gone")
        await asyncio.sleep(0.01)
        return transport.written

    assert asyncio.run(run()) == []
