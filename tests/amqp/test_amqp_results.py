"""Return values on the real RabbitMQ: a three-stage ``publish_to`` chain (exactly once without
faults, at least once with RabbitMQ restarted mid-run), a pika producer -> fastq consumer ->
pika consumer pipeline of raw bodies, and ``call`` with a SQLite result store."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pika
import pytest

import fastq
from fastq.testing import rabbitmq_stopped, wait_until

APP = """
import os
import fastq, msgspec

app = fastq.App("amqp-results", broker={url!r}, result_store="sqlite:///{store}")
OUT = {out!r}


def _write(text: str) -> None:
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@app.task(queue="{q}.c")
def stage_c(n: int) -> None:
    _write(f"{{n}}\\n")


@app.task(queue="{q}.b", publish_to=stage_c)
def stage_b(n: int) -> int:
    return n + 1


@app.task(queue="{q}.a", publish_to=stage_b)
async def stage_a(n: int) -> int:
    return n * 2


@app.task(queue="{q}.rpc")
async def double(n: int) -> int:
    return n * 2


@app.task(queue="{q}.rpc", max_retries=1, retry_backoff=0.01)
def refuse(n: int) -> int:
    raise PermissionError(f"not {{n}}")


@app.task(queue="{q}.rpc", result_ttl=60)
async def kept(n: int) -> list[int]:
    return [n, n]


@app.task(
    queue="{q}.route",
    publish_to=fastq.Route(exchange="{q}.x", routing_key="made.one", exchange_kind="topic"),
)
def route_it(n: int) -> int:
    return n + 1_000_000


@app.consumer("{q}.routed", exchange="{q}.x", exchange_kind="topic", routing_key="made.#")
def routed(body: bytes) -> None:
    _write(f"{{msgspec.msgpack.decode(body)}}\\n")


@app.consumer("{q}.raw", publish_to="{q}.out")
def shout(body: bytes) -> bytes:
    return body.upper()
"""


class Chain:
    def __init__(self, tmp_path: Path, url: str) -> None:
        self.url, self.dir, self.out = url, tmp_path, tmp_path / "out.txt"
        self.q = f"fq-res-{uuid.uuid4().hex[:8]}"
        self.module = f"amqp_results_{self.q.replace('-', '_')}"
        (tmp_path / f"{self.module}.py").write_text(
            textwrap.dedent(
                APP.format(url=url, out=str(self.out), q=self.q, store=tmp_path / "results.db")
            )
        )
        sys.path.insert(0, str(tmp_path))
        self.app = __import__(self.module)
        self.log = open(tmp_path / "worker.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastq", "worker", f"{self.module}:app", "--log-level", "info"],
            cwd=tmp_path,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def logtext(self) -> str:
        self.log.flush()
        return (self.dir / "worker.log").read_text()[-4000:]

    def outputs(self) -> collections.Counter[int]:
        text = self.out.read_text() if self.out.exists() else ""
        return collections.Counter(int(w) for w in text.split())

    def depth(self, queue: str) -> int:
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            return connection.channel().queue_declare(queue, passive=True).method.message_count
        finally:
            connection.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
        self.log.close()
        sys.path.remove(str(self.dir))
        sys.modules.pop(self.module, None)
        connection = pika.BlockingConnection(pika.URLParameters(self.url))
        try:
            channel = connection.channel()
            for name in ("a", "b", "c", "rpc", "raw", "out", "route", "routed"):
                for suffix in ("", ".dlq"):
                    channel.queue_delete(f"{self.q}.{name}{suffix}")
            channel.exchange_delete(f"{self.q}.x")
        finally:
            connection.close()


@pytest.fixture
def chain(tmp_path, amqp_url):
    c = Chain(tmp_path, amqp_url)
    yield c
    c.close()


def _wait_consumed(
    chain: Chain, connection: pika.BlockingConnection, queue: str
) -> pika.adapters.blocking_connection.BlockingChannel:
    """Until the supervisor consumes ``queue``; a channel that works."""
    opened = [connection.channel()]

    def consumed() -> bool:
        try:
            q = opened[0].queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker:  # not declared yet
            opened[0] = connection.channel()
            return False
        return bool(q.method.consumer_count)

    wait_until(consumed, 60, chain.logtext, interval=0.1)
    return opened[0]


def _send(chain: Chain, n: int) -> None:
    for start in range(0, n, 1000):
        chain.app.stage_a.send_many([(i,) for i in range(start, start + 1000)])


def test_a_three_stage_chain_on_rabbitmq_delivers_every_output_exactly_once(chain):
    n = 20_000
    _send(chain, n)
    wait_until(
        lambda: sum(chain.outputs().values()) >= n,
        240,
        lambda: f"{sum(chain.outputs().values())} of {n}; {chain.logtext()}",
    )
    time.sleep(1.0)  # a duplicate would show by now
    assert chain.outputs() == collections.Counter(i * 2 + 1 for i in range(n))
    for stage in ("a", "b", "c"):
        assert chain.depth(f"{chain.q}.{stage}") == 0


def test_a_chain_with_rabbitmq_restarted_mid_run_loses_no_output(chain):
    n = 20_000
    _send(chain, n)
    wait_until(lambda: sum(chain.outputs().values()) >= 3000, 240, chain.logtext)
    with rabbitmq_stopped():  # started again however the block ends
        time.sleep(2)
    wait_until(
        lambda: set(chain.outputs()) == {i * 2 + 1 for i in range(n)},
        300,
        lambda: f"{len(chain.outputs())} of {n} distinct; {chain.logtext()}",
    )
    chain.log.flush()
    assert "reconnected to RabbitMQ" in (chain.dir / "worker.log").read_text()


def test_pika_producer_to_a_fastq_consumer_to_a_pika_consumer(chain):
    connection = pika.BlockingConnection(pika.URLParameters(chain.url))
    try:
        channel = _wait_consumed(chain, connection, f"{chain.q}.raw")
        channel.queue_declare(f"{chain.q}.out", passive=True)  # the supervisor declared it
        bodies = [f"body {i}".encode() for i in range(500)]
        for body in bodies:
            channel.basic_publish("", f"{chain.q}.raw", body)
        got: list[bytes] = []
        deadline = time.monotonic() + 120
        while len(got) < len(bodies) and time.monotonic() < deadline:
            method, _, body = channel.basic_get(f"{chain.q}.out", auto_ack=True)
            if method is None:
                time.sleep(0.05)
            else:
                got.append(body)
        assert sorted(got) == sorted(b.upper() for b in bodies)
    finally:
        connection.close()


def test_call_on_rabbitmq_uses_direct_reply_to_and_result_uses_the_store(chain):
    a = chain.app
    assert a.double.call(21, timeout=60) == 42
    assert [a.double.call(i, timeout=60) for i in range(50)] == [i * 2 for i in range(50)]
    with pytest.raises(fastq.TaskFailed) as failed:
        a.refuse.call(3, timeout=60)  # retried once (the reply_to survives the retry copy)
    assert (failed.value.error_type, failed.value.error_message) == ("PermissionError", "not 3")
    assert "(after 2 attempts)" in failed.value.reason

    async def many() -> list[int]:
        return await asyncio.gather(*(a.double.call_async(i, timeout=120) for i in range(1000)))

    assert asyncio.run(many()) == [i * 2 for i in range(1000)]
    message_id = a.kept.send(4)  # result_ttl on RabbitMQ: kept in the App's result_store
    assert a.kept.result(message_id, timeout=60) == [4, 4]
    assert chain.depth(f"{chain.q}.rpc") == 0


def test_publish_to_a_route_reaches_the_queues_bound_to_its_exchange(chain):
    connection = pika.BlockingConnection(pika.URLParameters(chain.url))
    try:
        _wait_consumed(chain, connection, f"{chain.q}.routed")  # bound to the exchange by then
    finally:
        connection.close()
    chain.app.route_it.send_many([(i,) for i in range(2000)])
    wait_until(
        lambda: sum(chain.outputs().values()) >= 2000,
        120,
        lambda: f"{sum(chain.outputs().values())} of 2000; {chain.logtext()}",
    )
    time.sleep(0.5)
    assert chain.outputs() == collections.Counter(i + 1_000_000 for i in range(2000))
