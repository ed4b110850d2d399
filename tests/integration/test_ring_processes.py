"""Rings between real processes (spawn): volume, round trips, a peer killed, the creator failing."""

from __future__ import annotations

import asyncio
import importlib
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest

from fastq.errors import PeerLost, RingClosed, RingFull
from fastq.testing import wait_until

ctx = multiprocessing.get_context("spawn")
BATCH = 256


def _impl(ring_impl) -> str:
    return ring_impl.__name__


def _frames(seed: int, count: int):
    """The same pseudo-random frames (1..4096 bytes) in every process, in batches."""
    rnd = random.Random(seed)
    pool = rnd.randbytes(1 << 16)
    batch = []
    for _ in range(count):
        size = rnd.randint(1, 4096)
        off = rnd.randrange(len(pool) - size)
        batch.append(pool[off : off + size])
        if len(batch) == BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _checksum(crc: int, frames: list[bytes]) -> int:
    for f in frames:  # order- and boundary-sensitive
        crc = zlib.crc32(f, zlib.crc32(len(f).to_bytes(4, "little"), crc))
    return crc


def _produce(impl: str, name: str, seed: int, count: int, results) -> None:
    ring = importlib.import_module(impl).Ring.attach(name)
    crc = 0
    for batch in _frames(seed, count):
        ring.put_many(batch, timeout=60)
        crc = _checksum(crc, batch)
    results.put(crc)
    ring.close()  # after the last frame: the consumer drains, then sees RingClosed


def test_a_million_random_frames_arrive_whole_and_in_order(ring_impl):
    # Given a ring and a producer process sending 1,000,000 frames of 1..4096 bytes
    ring = ring_impl.Ring.create(1 << 20)
    results = ctx.SimpleQueue()
    count, seed = 1_000_000, random.randrange(1 << 32)
    producer = ctx.Process(
        target=_produce, args=(_impl(ring_impl), ring.name, seed, count, results)
    )
    producer.start()
    try:
        # When this process consumes until the producer closes the ring
        n, crc = 0, 0
        while True:
            try:
                frames = ring.get_many(4096, timeout=60)
            except RingClosed:
                break
            n += len(frames)
            crc = _checksum(crc, frames)
        producer.join(60)
        # Then every frame arrived, in order, byte for byte (seed printed for a rerun)
        assert (n, producer.exitcode) == (count, 0), f"seed={seed}"
        assert crc == results.get(), f"seed={seed}"
    finally:
        producer.kill()
        ring.close()
        ring.unlink()


def _request(seq: int) -> bytes:
    return seq.to_bytes(8, "little") + b"q" * (seq % 32)


def _echo(impl: str, requests: str, replies: str) -> None:
    mod = importlib.import_module(impl)
    inbox, outbox = mod.Ring.attach(requests), mod.Ring.attach(replies)
    while True:
        try:
            frames = inbox.get_many(1024, timeout=60)
        except RingClosed:
            break
        outbox.put_many([f[::-1] for f in frames], timeout=60)
    outbox.close()


def test_two_rings_carry_200000_round_trips(ring_impl):
    # Given a request ring and a completion ring to an echo process
    requests, replies = ring_impl.Ring.create(1 << 18), ring_impl.Ring.create(1 << 18)
    echo = ctx.Process(target=_echo, args=(_impl(ring_impl), requests.name, replies.name))
    echo.start()
    try:
        # When 200,000 requests go out with at most 2,048 in flight
        total, window, sent, answered = 200_000, 2048, 0, 0
        while answered < total:
            if sent < total and sent - answered < window:
                n = min(BATCH, total - sent, window - (sent - answered))
                requests.put_many([_request(seq) for seq in range(sent, sent + n)], timeout=60)
                sent += n
            for reply in replies.get_many(BATCH, timeout=60):
                # Then each reply answers the next request, in order
                assert reply == _request(answered)[::-1]
                answered += 1
        requests.close()
        with pytest.raises(RingClosed):
            replies.get_many(timeout=60)
        echo.join(60)
        assert echo.exitcode == 0
        assert replies.statistics().frames_got == total
    finally:
        echo.kill()
        for r in (requests, replies):
            r.close()
            r.unlink()


def _consume_slowly(impl: str, name: str) -> None:
    ring = importlib.import_module(impl).Ring.attach(name)
    ring.get_many(1)
    time.sleep(600)  # holds its end until killed


def test_a_producer_blocked_on_a_killed_consumer_gives_up_within_its_timeout(ring_impl):
    # Given a consumer process that takes one frame and then stops reading
    ring = ring_impl.Ring.create(4096)
    consumer = ctx.Process(target=_consume_slowly, args=(_impl(ring_impl), ring.name))
    consumer.start()
    try:
        ring.put(b"first")
        wait_until(lambda: ring.statistics().frames_got >= 1, 30, interval=0.01)
        ring.put_many([b"x" * 1000] * 4)  # now the ring is full
        # When the consumer is killed while the producer waits for room
        killed_at = time.monotonic()
        os.kill(consumer.pid, signal.SIGKILL)
        # Then the producer's put raises within its timeout instead of hanging
        with pytest.raises((PeerLost, RingFull)) as exc:
            ring.put_many([b"y" * 1000], timeout=5)
        assert time.monotonic() - killed_at <= 5 + 1
        assert isinstance(exc.value, PeerLost), "the dead consumer is noticed before the timeout"
        assert not ring.consumer_alive()
    finally:
        consumer.kill()
        consumer.join()
        ring.close()
        ring.unlink()


def _produce_then_hang(impl: str, name: str) -> None:
    ring = importlib.import_module(impl).Ring.attach(name)
    ring.put(b"only one")
    time.sleep(600)


def test_a_consumer_waiting_forever_on_a_killed_producer_gets_peer_lost(ring_impl):
    ring = ring_impl.Ring.create(4096)
    producer = ctx.Process(target=_produce_then_hang, args=(_impl(ring_impl), ring.name))
    producer.start()
    try:
        assert ring.get_many(timeout=30) == [b"only one"]
        os.kill(producer.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(
            PeerLost, match=rf"^the producer of ring '{ring.name}' \(pid {producer.pid}\) is gone$"
        ):
            ring.get_many()  # no timeout at all: the peer's death still ends the wait
        assert time.monotonic() - started < 10
    finally:
        producer.kill()
        producer.join()
        ring.close()
        ring.unlink()


def _consume_async(impl: str, name: str, results) -> None:
    import fastq.ring  # get_many_async works with either implementation's Ring

    ring = importlib.import_module(impl).Ring.attach(name)

    async def main() -> tuple[int, int]:
        n = crc = 0
        while True:
            try:
                frames = await fastq.ring.get_many_async(ring, 512, timeout=60)
            except RingClosed:
                return n, crc
            n += len(frames)
            crc = _checksum(crc, frames)

    results.put(asyncio.run(main()))


def test_an_asyncio_consumer_in_another_process_is_woken_through_fileno(ring_impl):
    ring = ring_impl.Ring.create(1 << 16)
    results = ctx.SimpleQueue()
    consumer = ctx.Process(target=_consume_async, args=(_impl(ring_impl), ring.name, results))
    consumer.start()
    try:
        crc, n = 0, 0
        for batch in _frames(7, 20_000):
            ring.put_many(batch, timeout=60)
            crc = _checksum(crc, batch)
            n += len(batch)
            if n % 2048 == 0:
                time.sleep(0.002)  # let the consumer go to sleep now and then
        ring.close()
        assert results.get() == (20_000, crc)
        consumer.join(60)
        assert consumer.exitcode == 0
    finally:
        consumer.kill()
        ring.unlink()


CREATOR = """
import os, signal, sys, time
import {impl} as impl
ring = impl.Ring.create(4096)
print(ring.name, flush=True)
if sys.argv[1] == "raise":
    raise RuntimeError("the creator fails")
time.sleep(600)
"""


@pytest.mark.parametrize("how", ["raise", "sigkill"])
def test_nothing_is_left_in_dev_shm_when_the_creator_dies(ring_impl, how):
    # Given a process that creates a ring and then fails, or is killed
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CREATOR.format(impl=_impl(ring_impl))), how],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    name = proc.stdout.readline().strip()
    path = Path("/dev/shm") / name
    assert name.startswith("fq-")
    if how == "sigkill":
        assert path.exists()
        proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    # Then its segment is gone (a SIGKILL leaves it to the resource tracker, a moment later)
    wait_until(lambda: not path.exists(), 10, f"{path} is still there")
    proc.stdout.close()
    proc.stderr.close()
