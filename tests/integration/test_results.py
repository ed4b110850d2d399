"""Return values with real processes on SQLite: typed results, failures with the remote
traceback, expiry, ``call`` (also 1,000 at once), and ``publish_to`` chains (exactly once without
faults, at least once with workers SIGKILLed)."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import fastq
from fastq.broker.base import Message
from fastq.testing import wait_until

APP = """
import os
import fastq, msgspec

app = fastq.App("results", broker="sqlite:///{db}")
OUT = {out!r}


class Order(msgspec.Struct):
    id: int
    total: float


class Receipt(msgspec.Struct):
    order: int
    cents: int


@app.task(queue="r", result_ttl=60)
async def receipt(order: Order) -> Receipt:
    return Receipt(order.id, round(order.total * 100))


@app.task(queue="r", result_ttl=60)
def pair(a: int, b: str) -> tuple[int, str]:
    return (a, b)


@app.task(queue="r", result_ttl=60)
async def nothing() -> None:
    return None


@app.task(queue="r", result_ttl=60, max_retries=1, retry_backoff=0.01)
def boom(n: int) -> int:
    raise ValueError(f"no {{n}}")


@app.task(queue="r", result_ttl=1)
async def short(n: int) -> int:
    return n


@app.task(queue="r")
async def double(n: int) -> int:
    return n * 2


@app.task(queue="r", result_ttl=60, max_retries=0)
async def wrong(n: int) -> int:
    return "not a number"  # type: ignore[return-value]


def _write(text: str) -> None:
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@app.task(queue="c")
def stage_c(n: int) -> None:
    _write(f"{{n}}\\n")


@app.task(queue="b", publish_to=stage_c)
def stage_b(n: int) -> int:
    return n + 1


@app.task(queue="a", publish_to=stage_b)
async def stage_a(n: int) -> int:
    if n < 0:
        return "a string is not an int"  # type: ignore[return-value]
    return n * 2


@app.consumer("raw", publish_to="raw-out")
def shout(body: bytes) -> list[bytes]:
    return [body.upper(), body]
"""


class Worker:
    def __init__(self, tmp_path: Path) -> None:
        self.dir, self.out = tmp_path, tmp_path / "out.txt"
        (tmp_path / "results_app.py").write_text(
            textwrap.dedent(APP.format(db=tmp_path / "q.db", out=str(self.out)))
        )
        sys.path.insert(0, str(tmp_path))
        import results_app

        self.app = results_app
        self.log = open(tmp_path / "worker.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastq", "worker", "results_app:app", "--log-level", "info"],
            cwd=tmp_path,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def logtext(self) -> str:
        return (self.dir / "worker.log").read_text()[-3000:]

    def workers(self) -> list[psutil.Process]:
        found = []
        for p in psutil.Process(self.proc.pid).children():
            try:
                if "spawn_main" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return found

    def outputs(self) -> collections.Counter[int]:
        text = self.out.read_text() if self.out.exists() else ""
        return collections.Counter(int(w) for w in text.split())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                assert self.proc.wait(60) == 0, self.logtext()
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()
        self.log.close()
        sys.path.remove(str(self.dir))
        sys.modules.pop("results_app", None)


@pytest.fixture
def worker(tmp_path):
    w = Worker(tmp_path)
    yield w
    w.close()


def test_results_round_trip_typed_and_failures_carry_the_remote_traceback(worker):
    a = worker.app
    ids = {
        "receipt": a.receipt.send(a.Order(7, 12.5)),
        "pair": a.pair.send(3, "x"),
        "nothing": a.nothing.send(),
        "boom": a.boom.send(5),
        "wrong": a.wrong.send(1),
    }
    got = a.receipt.result(ids["receipt"], timeout=60)
    assert got == a.Receipt(7, 1250) and type(got) is a.Receipt
    assert a.pair.result(ids["pair"], timeout=60) == (3, "x")
    assert a.nothing.result(ids["nothing"], timeout=60) is None
    with pytest.raises(fastq.TaskFailed) as failed:
        a.boom.result(ids["boom"], timeout=60)
    e = failed.value
    assert (e.error_type, e.error_message, e.message_id) == ("ValueError", "no 5", ids["boom"])
    assert 'raise ValueError(f"no {n}")' in e.traceback and "(after 2 attempts)" in e.reason
    with pytest.raises(fastq.TaskFailed) as failed:
        a.wrong.result(ids["wrong"], timeout=60)
    assert failed.value.error_type == "MessageError"
    assert "does not encode as its return annotation int" in failed.value.reason
    dead = a.app.broker.dead_letters("r")
    assert sorted(d.message_id for d in dead) == sorted([ids["boom"], ids["wrong"]])
    with pytest.raises(TimeoutError, match="still queued or running"):
        a.pair.result("no-such-id", timeout=0.2)


def test_a_result_expires_after_its_ttl(worker):
    a = worker.app
    message_id = a.short.send(41)
    assert a.short.result(message_id, timeout=60) == 41
    time.sleep(1.2)
    with pytest.raises(fastq.ResultExpired, match="expired"):
        a.short.result(message_id, timeout=5)


def test_call_waits_for_the_value_and_1000_concurrent_call_async(worker):
    a = worker.app
    assert a.double.call(21, timeout=60) == 42  # no result_ttl: call keeps it anyway
    assert a.receipt.call(a.Order(1, 0.01), timeout=60) == a.Receipt(1, 1)

    async def many() -> list[int]:
        return await asyncio.gather(*(a.double.call_async(i, timeout=120) for i in range(1000)))

    assert asyncio.run(many()) == [i * 2 for i in range(1000)]


def test_a_three_stage_chain_delivers_every_output_exactly_once(worker):
    a = worker.app
    n = 20_000
    for start in range(0, n, 1000):
        a.stage_a.send_many([(i,) for i in range(start, start + 1000)])
    bad = a.stage_a.send(-1)
    wait_until(
        lambda: sum(worker.outputs().values()) >= n,
        240,
        lambda: f"{sum(worker.outputs().values())} of {n}; {worker.logtext()}",
    )
    time.sleep(0.5)  # a duplicate would show by now
    assert worker.outputs() == collections.Counter(i * 2 + 1 for i in range(n))
    wait_until(lambda: a.app.broker.dead_letters("a"), 30, worker.logtext)
    dead = a.app.broker.dead_letters("a")
    assert [d.message_id for d in dead] == [bad]
    assert "cannot take as its argument" in dead[0].reason


def test_a_chain_with_workers_sigkilled_twice_loses_no_output(worker):
    a = worker.app
    n = 20_000
    for start in range(0, n, 1000):
        a.stage_a.send_many([(i,) for i in range(start, start + 1000)])
    for kills in (n // 4, n // 2):
        wait_until(lambda k=kills: sum(worker.outputs().values()) >= k, 240, worker.logtext)
        victims = worker.workers()
        assert victims, worker.logtext()
        victims[0].send_signal(signal.SIGKILL)
    wait_until(
        lambda: set(worker.outputs()) == {i * 2 + 1 for i in range(n)},
        240,
        lambda: f"{len(worker.outputs())} of {n} distinct; {worker.logtext()}",
    )
    assert a.app.broker.dead_letters() == []


def test_a_consumer_publishes_raw_bodies(worker):
    broker = worker.app.app.broker
    broker.publish_sync("raw", [Message(b"hello", "m1")])

    async def take() -> list[bytes]:
        await broker.open()
        got: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(got) < 2 and time.monotonic() < deadline:
            ds = await broker.fetch("raw-out", 10, timeout=0.5)
            got += [d.body for d in ds]
            await broker.settle("raw-out", ack=[d.tag for d in ds])
        await broker.close()
        return got

    assert asyncio.run(take()) == [b"HELLO", b"hello"]
