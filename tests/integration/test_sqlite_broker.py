"""The SQLite broker between real processes: many producers, two consumers, a consumer killed."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import sqlite3
import time

from fastq.broker import open_broker
from fastq.broker.base import Message, QueueDepth

ctx = multiprocessing.get_context("spawn")


async def opened(url, n=2):
    """``n`` brokers of one file, opened."""
    brokers = [open_broker(url) for _ in range(n)]
    for b in brokers:
        await b.open()
    return brokers


def msgs(n, prefix=b"m"):
    return [Message(prefix + b"%d" % i, f"id-{i}") for i in range(n)]


def _produce(url: str, producer: int, count: int) -> None:
    broker = open_broker(url)
    for start in range(0, count, 100):  # many small transactions, interleaving with the others
        broker.publish_sync(
            "q", [Message(b"x", f"p{producer}-{i}") for i in range(start, start + 100)]
        )


def test_ten_producer_processes_at_once_lose_nothing(tmp_path):
    url = f"sqlite:///{tmp_path}/many.db"
    procs = [ctx.Process(target=_produce, args=(url, p, 2_000)) for p in range(10)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 10
    ids = [
        r[0]
        for r in sqlite3.connect(f"{tmp_path}/many.db").execute(
            "SELECT message_id FROM fastq_messages"
        )
    ]
    assert len(ids) == len(set(ids)) == 20_000


def _consume(url: str, seen, stop_after: float, start) -> None:
    async def main() -> None:
        broker = open_broker(url)
        await broker.open()
        start.wait()  # both open: neither drains the file before the other has started
        ids: list[str] = []
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < stop_after:
            got = await broker.fetch("q", 64, timeout=0.2)
            if got:
                idle_since = time.monotonic()
                ids += [d.message_id for d in got]
                # the work: a consumer that only takes would starve the other
                await asyncio.sleep(0.001)
                await broker.settle("q", ack=[d.tag for d in got])
        await broker.close()
        seen.put(ids)  # once, at the end: the parent reads it before it joins

    asyncio.run(main())


def test_two_consumers_on_one_file_split_the_work_and_see_each_message_once(tmp_path):
    # Given 10,000 messages in one file and two consumer processes (two supervisors' brokers)
    url = f"sqlite:///{tmp_path}/two.db"
    open_broker(url).publish_sync("q", msgs(10_000))
    seen = ctx.SimpleQueue()
    start = ctx.Barrier(2)
    consumers = [ctx.Process(target=_consume, args=(url, seen, 1.0, start)) for _ in range(2)]
    for c in consumers:
        c.start()
    first, second = seen.get(), seen.get()
    for c in consumers:
        c.join(60)
    # Then every message was delivered exactly once (no fault, no duplicate), and both worked
    assert sorted(first + second) == sorted(f"id-{i}" for i in range(10_000))
    assert first and second


def _hold(url: str, ready) -> None:
    async def main() -> None:
        broker = open_broker(url)
        await broker.open()
        got = await broker.fetch("q", 500, timeout=5)
        ready.put(len(got))
        await asyncio.sleep(600)  # holds its leases, renewing them, until killed

    asyncio.run(main())


def test_the_leases_of_a_killed_consumer_lapse_and_another_gets_everything(tmp_path):
    url = f"sqlite:///{tmp_path}/killed.db?lease=1"
    open_broker(url).publish_sync("q", msgs(1_000))
    ready = ctx.SimpleQueue()
    holder = ctx.Process(target=_hold, args=(url, ready))
    holder.start()
    try:
        assert ready.get() == 500
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()

        async def main() -> list[str]:
            broker = open_broker(url)
            await broker.open()
            ids: list[str] = []
            deadline = time.monotonic() + 30
            while len(ids) < 1_000 and time.monotonic() < deadline:
                got = await broker.fetch("q", 256, timeout=1)
                ids += [d.message_id for d in got]
                # the work: a consumer that only takes would starve the other
                await asyncio.sleep(0.001)
                await broker.settle("q", ack=[d.tag for d in got])
            depth = await broker.queue_depth("q")
            await broker.close()
            assert depth == QueueDepth(0, 0, 0)
            return ids

        ids = asyncio.run(main())
        assert sorted(ids) == sorted(f"id-{i}" for i in range(1_000))
    finally:
        holder.kill()


def test_a_lease_that_lapses_makes_the_message_visible_to_another_consumer(tmp_path):
    url = f"sqlite:///{tmp_path}/lease.db?lease=1"

    async def main():
        a, b = await opened(url)
        a._renewer.cancel()  # a consumer that stopped renewing, as a dead one does
        await a.publish("q", msgs(1))
        (held,) = await a.fetch("q", 1, timeout=1)
        assert await b.fetch("q", 1, timeout=0.2) == []
        (taken,) = await b.fetch("q", 1, timeout=3)
        assert (taken.body, taken.attempts) == (b"m0", 2)
        # The first consumer's late ack touches nothing it no longer holds
        await a.settle("q", ack=[held.tag])
        assert await b.queue_depth("q") == QueueDepth(ready=0, unacked=1, delayed=0)
        await b.settle("q", ack=[taken.tag])
        assert await b.queue_depth("q") == QueueDepth(0, 0, 0)
        await b.close()
        await a.close()  # it holds nothing any more: its close releases nothing

    asyncio.run(main())


def test_a_live_consumer_keeps_its_leases(tmp_path):
    url = f"sqlite:///{tmp_path}/renew.db?lease=1"

    async def main():
        a, b = await opened(url)
        await a.publish("q", msgs(1))
        assert len(await a.fetch("q", 1, timeout=1)) == 1
        assert await b.fetch("q", 1, timeout=2.5) == []  # two and a half leases: renewed
        await a.close()
        await b.close()

    asyncio.run(main())


def test_outputs_settled_by_one_supervisor_wake_another_consumer_of_the_file_not_itself(tmp_path):
    from fastq.broker.base import Output

    url = f"sqlite:///{tmp_path}/outputs.db?poll=60"

    async def main():
        first, second = await opened(url)
        first.publish_sync("q", msgs(1))
        # Given a supervisor holding a message, and another consumer of the file waiting for
        # the queue the first one's handler publishes to
        (d,) = await first.fetch("q", 1, timeout=1)
        assert await second.fetch("out", 1, timeout=0.01) == []
        waiting = asyncio.create_task(second.fetch("out", 10, timeout=30))
        await asyncio.sleep(0.2)  # it waits between looks now (1 ms doubling up to 60 s):
        # what proves the wake-up is the ring counted below, not the arrival
        rung = first._door.rung
        # When the first settles the message with its output, in one transaction
        out = Output("out", Message(b"made", "out-1"))
        await first.exchange("q", ack=[d.tag], outputs=[out], fetch=0)
        # Then the other one was rung and took it; the first was not rung by its own write
        got = await asyncio.wait_for(waiting, 10)
        assert [(g.body, g.message_id) for g in got] == [(b"made", "out-1")]
        assert second._door.rung >= 1 and first._door.rung == rung
        assert first._bell.own == first._door.slot
        await second.settle("out", ack=[g.tag for g in got])
        await first.close()
        await second.close()

    asyncio.run(main())


def test_a_send_by_another_broker_of_the_file_wakes_its_waiting_consumers(tmp_path):
    from fastq.broker import sqlite_wake

    url = f"sqlite:///{tmp_path}/wake.db?poll=60"

    async def main():
        first, second = await opened(url)
        # Given two consumers of one file, each listening on a slot of its own once it fetched
        assert await first.fetch("q", 1, timeout=0.01) == []
        assert await second.fetch("other", 1, timeout=0.01) == []
        assert (first._door.slot, second._door.slot) == (0, 1)
        waiting = [
            asyncio.create_task(first.fetch("q", 10, timeout=30)),
            asyncio.create_task(second.fetch("other", 10, timeout=30)),
        ]
        await asyncio.sleep(0.2)  # both wait between looks now
        # When a producer that never opened (send() in another process) enqueues on each queue
        producer = open_broker(url)
        producer.publish_sync("q", msgs(3))
        producer.publish_sync("other", msgs(1))
        got = await asyncio.gather(*waiting)
        # Then each consumer was rung and took its queue's messages; the unbound slots refused
        # and are skipped for a while
        assert [[d.body for d in g] for g in got] == [[b"m0", b"m1", b"m2"], [b"m0"]]
        assert first._door.rung >= 1 and second._door.rung >= 1
        skipped = [t > 0 for t in producer._bell.skip_until]
        assert skipped == [False, False] + [True] * (sqlite_wake.SLOTS - 2)
        for b in (first, second):
            await b.settle("q" if b is first else "other", ack=[d.tag for d in got[b is second]])
            await b.close()
        assert first._door is None  # closed: the slot is free for the next consumer

    asyncio.run(main())
