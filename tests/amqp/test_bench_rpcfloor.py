"""The pipeline bench's floor for ``call`` on RabbitMQ (``fastq._bench.rpcfloor``): its server
and client processes run against the real RabbitMQ, every request gets its own reply, and the
round's queue is gone afterwards."""

from __future__ import annotations

import asyncio
import os

import aiormq
import pytest

from fastq._bench import rpcfloor
from fastq.testing import require_amqp


def _exists(url: str, queue: str) -> bool:
    async def look() -> bool:
        connection = await aiormq.connect(url)
        try:
            channel = await connection.channel()
            try:
                await channel.queue_declare(queue, passive=True)
            except aiormq.ChannelNotFoundEntity:
                return False
            return True
        finally:
            await connection.close()

    return asyncio.run(look())


def test_rpc_floor_times_every_call_and_deletes_its_queue() -> None:
    url = require_amqp()
    lines: list[str] = []
    row = rpcfloor.measure(url, 2, 7, lines.append, warmup=3)
    assert row["system"] == rpcfloor.NAME
    assert 0 < row["call_p50_ms"] <= row["call_p99_ms"]
    assert len(lines) == 2  # one line a round
    # one round by hand: 7 timed calls after 3 not counted (the client checks each reply is its
    # own request's), and the queue deleted by measure's cleanup
    queue = f"fq-rpc-test-{os.getpid()}"
    try:
        times = rpcfloor._round(url, queue, 7, 3)
    finally:
        from fastq._bench.amqp import _purge

        _purge(url, [queue], delete=True)
    assert len(times) == 7 and all(t > 0 for t in times)
    assert not _exists(url, queue)


def test_rpc_floor_says_when_its_server_cannot_start() -> None:
    url = "amqp://guest:wrong@127.0.0.1:5672/"
    require_amqp()
    with pytest.raises(RuntimeError, match="the RPC server did not start") as raised:
        rpcfloor._round(url, f"fq-rpc-bad-{os.getpid()}", 1, 0)
    assert "ACCESS_REFUSED" in str(raised.value)  # RabbitMQ's reason, not the password
    assert "wrong" not in str(raised.value)
