"""The RabbitMQ broker in-process, against the real RabbitMQ: prefetch changes, consumers and
channels that RabbitMQ takes away, queues deleted under a publisher."""

from __future__ import annotations

import asyncio
import uuid

import pika
import pytest

from fastq.broker import open_broker
from fastq.broker.base import Message


@pytest.fixture
def queue(amqp_url):
    name = f"fq-unit-{uuid.uuid4().hex[:8]}"
    yield name
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    for q in (name, f"{name}.dlq"):
        channel.queue_delete(q)
    connection.close()


def _messages(n: int, start: int = 0) -> list[Message]:
    return [Message(b"%d" % i, f"m{i}") for i in range(start, start + n)]


async def _filled(amqp_url: str, queue: str, n: int, *, prefetch: int):
    """An open broker, ``n`` messages published to ``queue``, its consumer at ``prefetch``."""
    broker = open_broker(amqp_url)
    await broker.open()
    await broker.declare(queue)
    await broker.publish(queue, _messages(n))
    await broker.prefetch(queue, prefetch)
    return broker


async def _drain(broker, queue: str, n: int, *, unique: set[str] | None = None) -> list:
    """Fetch and ack until ``n`` deliveries came (or, given ``unique``, until it holds ``n``
    ids)."""
    got = []
    deadline = asyncio.get_running_loop().time() + 30
    while (len(got) if unique is None else len(unique)) < n:
        assert asyncio.get_running_loop().time() < deadline, f"{len(got)} of {n}"
        batch = await broker.fetch(queue, 50, timeout=0.5)
        got += batch
        if unique is not None:
            unique.update(d.message_id for d in batch)
        if batch:
            await broker.settle(queue, ack=[d.tag for d in batch])
    return got


def test_a_prefetch_change_reaches_the_running_consumer_with_nothing_lost_or_doubled(
    amqp_url, queue
):
    async def main():
        broker = await _filled(amqp_url, queue, 300, prefetch=10)
        first = await broker.fetch(queue, 100, timeout=1)
        await asyncio.sleep(0.3)
        first += await broker.fetch(queue, 100, timeout=0.1)
        assert len(first) == 10  # unacked, RabbitMQ holds the rest back: qos 10
        # a new consumer on the same channel, the old one cancelled
        await broker.prefetch(queue, 50)
        await asyncio.sleep(0.3)
        second = await broker.fetch(queue, 100, timeout=0.1)
        assert len(second) == 50
        await broker.settle(queue, ack=[d.tag for d in first + second])
        rest = await _drain(broker, queue, 240)
        ids = [d.message_id for d in first + second + rest]
        assert sorted(ids) == sorted(f"m{i}" for i in range(300))  # each once
        assert all(d.attempts == 1 for d in first + second + rest)  # none redelivered
        await asyncio.sleep(0.2)
        depth = await broker.queue_depth(queue)
        assert (depth.ready, depth.consumers) == (0, 1)
        await broker.close()

    asyncio.run(main())


def test_a_consumer_rabbitmq_takes_away_is_rebuilt(amqp_url, queue):
    async def main():
        broker = open_broker(amqp_url)
        await broker.open()
        await broker.declare(queue)
        await broker.prefetch(queue, 20)
        await broker.publish(queue, _messages(100))
        seen: set[str] = set()
        await _drain(broker, queue, 30, unique=seen)
        consumer = broker.consumers.by_queue[queue]
        await consumer.channel.basic_cancel(consumer.tag)  # as RabbitMQ does when it cancels one
        await _drain(broker, queue, 60, unique=seen)
        await broker.consumers.by_queue[
            queue
        ].channel.close()  # as RabbitMQ does on a channel error
        await _drain(broker, queue, 100, unique=seen)  # what the closed channel held comes again
        assert seen == {f"m{i}" for i in range(100)}
        await asyncio.sleep(0.2)
        assert (await broker.queue_depth(queue)).ready == 0
        await broker.close()

    asyncio.run(main())


def test_publishing_survives_a_channel_error_and_a_deleted_queue(amqp_url, queue):
    async def main():
        broker = open_broker(amqp_url)
        await broker.open()
        await broker.declare(queue)
        with pytest.raises(Exception):  # noqa: B017 - RabbitMQ's 404, whatever aiormq calls it
            await broker.queue_depth(f"{queue}-missing")
        await broker.publish(queue, _messages(5))  # the publishing channel was not the one closed
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        connection.channel().queue_delete(queue)
        connection.close()
        # returned (no queue), declared again, published
        await broker.publish(queue, _messages(5, 5))
        depth = await broker.queue_depth(queue)
        # the first five went with the deleted queue; the next five are here
        assert depth.ready == 5
        await broker.close()

    asyncio.run(main())


def test_the_watchdog_rebuilds_a_consumer_that_gets_nothing_while_messages_wait(
    amqp_url, queue, monkeypatch
):
    from fastq.broker.amqp import consumer

    monkeypatch.setattr(consumer, "WATCHDOG_SECONDS", 0.5)

    async def main():
        broker = open_broker(amqp_url)
        await broker.open()
        await broker.declare(queue)
        await broker.prefetch(queue, 20)
        stuck = broker.consumers.by_queue[queue]
        stuck.alive = False  # it still holds its channel, but what comes to it goes nowhere
        await broker.publish(queue, _messages(100))
        seen: set[str] = set()
        await _drain(broker, queue, 100, unique=seen)  # the 20 it swallowed come back too
        assert seen == {f"m{i}" for i in range(100)}
        assert broker.consumers.by_queue[queue] is not stuck
        await broker.close()

    asyncio.run(main())


def test_what_rabbitmq_pushed_ahead_counts_as_waiting_for_autosize(amqp_url, queue):
    """A publishing queue's qos is its prefetch plus the confirm allowance, so RabbitMQ pushes
    work ahead of what the pump takes: ready at RabbitMQ it is not, waiting it is. The tuning
    loop's backlog counts it (a chain queue on RabbitMQ otherwise looked idle to autosize)."""
    import types

    from fastq.engine.tuning import Tuning

    async def main():
        broker = await _filled(amqp_url, queue, 300, prefetch=100)
        taken: list = []
        while len(taken) < 30:  # what has arrived, up to 30
            taken += await broker.fetch(queue, 30 - len(taken), timeout=1)
        for _ in range(200):  # until RabbitMQ has pushed its 100: 70 wait in this process
            if broker.buffered(queue) == 70:
                break
            await asyncio.sleep(0.05)
        depth = await broker.queue_depth(queue)
        assert (depth.ready, broker.buffered(queue)) == (200, 70)
        tuning = types.SimpleNamespace(engine=types.SimpleNamespace(broker=broker))
        assert await Tuning.backlogs(tuning, [queue]) == {queue: 270}  # type: ignore[arg-type]
        await broker.settle(queue, ack=[d.tag for d in taken])
        rest = await _drain(broker, queue, 270)
        assert sorted(d.message_id for d in taken + rest) == sorted(f"m{i}" for i in range(300))
        assert broker.buffered(queue) == 0
        await broker.close()

    asyncio.run(main())
