"""The pipeline bench's floor for ``call`` on RabbitMQ (``fastq._bench.rpcfloor``): its server
and client processes run against the real RabbitMQ, every request gets its own reply, each
round's queue is gone afterwards (also when the round fails), no process is left, and the
password never reaches what it says (``fastq.url.scrub``, tested in tests/unit/test_url.py)."""

from __future__ import annotations

import asyncio
import os
import urllib.parse

import aiormq
import psutil
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


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _with_password(url: str, password: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{parts.username or 'guest'}:{password}@{host}:{parts.port or 5672}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def test_rpc_floor_times_every_call_and_deletes_its_queues(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = require_amqp()
    queues: list[str] = []
    counts: list[int] = []
    real_round = rpcfloor._round

    def counted(url: str, queue: str, calls: int, warmup: int) -> list[float]:
        queues.append(queue)
        times = real_round(url, queue, calls, warmup)
        counts.append(len(times))
        return times

    monkeypatch.setattr(rpcfloor, "_round", counted)
    before = _children()
    lines: list[str] = []
    row = rpcfloor.measure(url, 2, 7, lines.append, warmup=3)
    assert row["system"] == rpcfloor.NAME
    assert counts == [7, 7]  # 7 timed calls a round, after 3 not counted (each reply checked
    assert len(lines) == 2  # by the client against its own request), one line a round
    assert len(set(queues)) == 2 and not any(_exists(url, q) for q in queues)
    assert _children() <= before


def test_a_failed_round_deletes_its_queue_and_leaves_no_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = require_amqp()
    queues: list[str] = []
    real_round = rpcfloor._round

    def fails(url: str, queue: str, calls: int, warmup: int) -> list[float]:
        queues.append(queue)
        real_round(url, queue, 1, 0)  # the server declared the queue and answered
        raise RuntimeError("the client failed")

    monkeypatch.setattr(rpcfloor, "_round", fails)
    before = _children()
    with pytest.raises(RuntimeError, match="the client failed"):
        rpcfloor.measure(url, 2, 1, lambda line: None)
    assert len(queues) == 1 and not _exists(url, queues[0])
    assert _children() <= before


def test_a_server_that_cannot_log_in_says_why_without_the_password() -> None:
    url = _with_password(require_amqp(), "s3cret-pw%21")  # decoded: s3cret-pw!
    before = _children()
    with pytest.raises(RuntimeError, match="the RPC server did not start") as raised:
        rpcfloor._round(url, f"fq-rpc-bad-{os.getpid()}", 1, 0)
    assert "ACCESS_REFUSED" in str(raised.value)  # RabbitMQ's reason
    assert _children() <= before
