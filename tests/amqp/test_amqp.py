"""RabbitMQ end to end: `fastq worker` as a real process tree on the real RabbitMQ at
$FASTQ_AMQP_URL (skipped when none answers, unless CI is set). Each test uses queues of its own
and deletes them after.

Handlers append what they got to a file (O_APPEND, one write per line): the tests count exactly
what was processed, and how often.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import msgspec
import pika
import psutil
import pytest

from fastq.testing import rabbitmq_stopped, wait_until

APP = """
import asyncio
import os
import fastq

app = fastq.App("amqp-tests", broker={url!r})
OUT = {out!r}

def _record(line: bytes) -> None:
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line)
    os.close(fd)

@app.task(queue={q!r}, kind="io")
async def record(n: int) -> None:
    _record(b"%d\\n" % n)

@app.task(queue={q!r} + ".pair", kind="io")
async def tagged(n: int) -> None:
    await asyncio.sleep(0.02)  # so that a host that starts later still finds work
    _record(b"%d %d\\n" % (n, os.getppid()))  # the supervisor that ran it

# 20 at once x 10 ms: 2,000/s, so that a fault injected after the first thousands lands mid-run
@app.task(queue={q!r} + ".slow", kind="io", concurrency=20)
async def slow(n: int) -> None:
    await asyncio.sleep(0.01)
    _record(b"%d\\n" % n)

@app.task(queue={q!r} + ".poison", max_retries=2, retry_backoff=0.02)
def flaky(n: int) -> None:
    _record(b"flaky %d\\n" % n)
    raise ValueError("always fails %d" % n)

@app.task(queue={q!r} + ".poison")
def fine(n: int) -> None:
    _record(b"fine %d\\n" % n)

@app.consumer({q!r} + ".raw", kind="io")
async def raw(body: bytes) -> None:
    _record(b"raw-%d %s\\n" % (os.getpid(), body))
"""


def _channel(url: str):
    connection = pika.BlockingConnection(pika.URLParameters(url))
    return connection, connection.channel()


class Rabbit:
    """A `fastq worker` on RabbitMQ, queues named for this test only."""

    def __init__(self, tmp_path: Path, url: str) -> None:
        self.url, self.dir, self.out = url, tmp_path, tmp_path / "out.txt"
        self.q = f"fq-test-{uuid.uuid4().hex[:8]}"
        self.module = f"amqp_app_{self.q.replace('-', '_')}"
        (tmp_path / f"{self.module}.py").write_text(
            textwrap.dedent(APP.format(url=url, out=str(self.out), q=self.q))
        )
        sys.path.insert(0, str(tmp_path))
        self.app = __import__(self.module)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log = open(tmp_path / "worker.log", "ab")

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fastq",
                "worker",
                f"{self.module}:app",
                "--log-level",
                "info",
                *args,
            ],
            cwd=self.dir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        return proc

    def lines(self) -> list[str]:
        return self.out.read_text().splitlines() if self.out.exists() else []

    def wait_for_lines(self, n: int, timeout: float = 120) -> None:
        def done() -> bool:
            assert all(p.poll() is None for p in self.procs), f"a worker exited: {self.logtext()}"
            return len(self.lines()) >= n

        wait_until(
            done, timeout, lambda: f"{len(self.lines())} of {n} processed; log: {self.logtext()}"
        )

    def wait_for_distinct(self, n: int, timeout: float = 120) -> None:
        """Until ``n`` different lines: a message processed twice (at least once) counts once."""
        wait_until(
            lambda: len(set(self.lines())) >= n,
            timeout,
            lambda: f"{len(set(self.lines()))} of {n}; log: {self.logtext()}",
            interval=0.1,
        )

    def stop(self, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> int:
        proc = proc or self.procs[-1]
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout)
        self.procs.remove(proc)
        return code

    def logtext(self) -> str:
        self.log.flush()
        return (self.dir / "worker.log").read_text()[-4000:]

    def wait_for_consumers(self, queues: list[str], timeout: float = 60) -> None:
        connection, channel = _channel(self.url)
        opened = [channel]

        def consumed(q: str) -> bool:
            try:
                return bool(opened[0].queue_declare(q, passive=True).method.consumer_count)
            except pika.exceptions.ChannelClosedByBroker:  # not declared yet
                opened[0] = connection.channel()
                return False

        try:
            for q in queues:
                wait_until(
                    lambda q=q: consumed(q),
                    timeout,
                    lambda q=q: f"no consumer on {q}: {self.logtext()}",
                    interval=0.1,
                )
        finally:
            connection.close()

    def depth(self, queue: str) -> int:
        connection, channel = _channel(self.url)
        try:
            return channel.queue_declare(queue, passive=True).method.message_count
        finally:
            connection.close()

    def workers(self, proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
        return [
            p
            for p in psutil.Process(proc.pid).children()
            if "spawn_main" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE
        ]

    def close(self) -> None:
        for proc in self.procs:  # not the resource tracker: it unlinks the rings after the kill
            for p in self.workers(proc):
                p.kill()
            proc.kill()
            proc.wait()
        self.log.close()
        sys.path.remove(str(self.dir))
        sys.modules.pop(self.module, None)
        connection, channel = _channel(self.url)
        try:
            for name in [self.q, *(f"{self.q}.{s}" for s in ("poison", "raw", "pair", "slow"))]:
                for suffix in ("", ".dlq"):
                    channel.queue_delete(name + suffix)
            for ms in _retry_queues(self.q):
                channel.queue_delete(ms)
        finally:
            connection.close()


def _retry_queues(prefix: str) -> list[str]:
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "name", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return [
        line.strip() for line in out.splitlines() if line.startswith(prefix) and ".retry." in line
    ]


@pytest.fixture
def rabbit(tmp_path, amqp_url):
    r = Rabbit(tmp_path, amqp_url)
    yield r
    r.close()


def _enqueue(r: Rabbit, n: int, task: str = "record") -> str:
    """``n`` messages for ``task``; its queue."""
    t = getattr(r.app, task)
    for start in range(0, n, 1000):
        t.send_many((i,) for i in range(start, min(n, start + 1000)))
    return str(t.queue)


def test_every_message_is_processed_and_acked(rabbit):
    _enqueue(rabbit, 5000)
    assert rabbit.depth(rabbit.q) == 5000  # send() returned: RabbitMQ confirmed each one
    rabbit.start("--processes", "2", "--queue", rabbit.q)
    rabbit.wait_for_lines(5000)
    assert rabbit.stop() == 0
    assert collections.Counter(rabbit.lines()) == collections.Counter(str(i) for i in range(5000))
    assert rabbit.depth(rabbit.q) == 0  # every one acked, none left unacked to come back


def test_autosize_keeps_rabbitmqs_unacked_window_to_what_100_handlers_had(rabbit):
    # Given a backlog met at the start: the I/O queue goes to the host's 1,000 handlers
    _enqueue(rabbit, 6000)
    rabbit.start("--processes", "2", "--queue", rabbit.q)
    rabbit.wait_for_lines(6000)
    assert rabbit.stop() == 0
    # Then on RabbitMQ its prefetch is 1,000 (100 x 10 at most, not 1,000 x 5): what is
    # delivered beyond the handlers costs RabbitMQ on the shared cores (SQLite: x 5, 5,000)
    import re

    sized = re.findall(
        r"autosize: queue '[^']+': .*; concurrency (\d+), prefetch (\d+)", rabbit.logtext()
    )
    assert sized and sized[0] == ("1000", "1000"), rabbit.logtext()[-3000:]
    assert all(int(p) <= max(int(c), 1000) for c, p in sized)
    assert collections.Counter(rabbit.lines()) == collections.Counter(str(i) for i in range(6000))
    assert rabbit.depth(rabbit.q) == 0


def test_retries_and_dead_letters_are_counted_exactly(rabbit):
    for i in range(20):
        rabbit.app.flaky.send(i)
    rabbit.app.fine.send_many((i,) for i in range(100))
    connection, channel = _channel(rabbit.url)
    try:  # not a message of any task, nor msgpack
        channel.basic_publish(
            "", f"{rabbit.q}.poison", b"\xc1 garbage", pika.BasicProperties(delivery_mode=2)
        )
    finally:
        connection.close()
    rabbit.start("--processes", "2", "--queue", f"{rabbit.q}.poison")
    rabbit.wait_for_lines(20 * 3 + 100)
    wait_until(
        lambda: rabbit.depth(f"{rabbit.q}.poison.dlq") >= 21, 30, rabbit.logtext, interval=0.1
    )
    assert rabbit.stop() == 0
    words = collections.Counter(line.split()[0] for line in rabbit.lines())
    assert words == {"flaky": 60, "fine": 100}  # each flaky one: the first try and 2 retries
    connection, channel = _channel(rabbit.url)
    try:
        dead = []
        while True:
            method, props, body = channel.basic_get(f"{rabbit.q}.poison.dlq", auto_ack=True)
            if method is None:
                break
            dead.append((props.headers or {}, body))
    finally:
        connection.close()
    assert len(dead) == 21
    garbage = [h for h, body in dead if body == b"\xc1 garbage"]
    assert len(garbage) == 1 and garbage[0]["x-fastq-reason"].startswith("undecodable")
    failed = [h for h, body in dead if body != b"\xc1 garbage"]
    assert all(
        h["x-fastq-exception"] == "ValueError"
        and h["x-fastq-attempts"] == 3
        and h["x-fastq-retries"] == 2
        and "always fails" in h["x-fastq-reason"]
        for h in failed
    )
    assert rabbit.depth(f"{rabbit.q}.poison") == 0


def test_a_plain_pika_producer_feeds_a_fastq_consumer_fairly(rabbit):
    """The work-queues tutorial's producer: durable queue, delivery_mode 2, raw bodies, sent
    while fastq's two workers are up (a backlog queued before they start may go to whichever
    worker is up first: fastq drains 2,000 noop messages in a few milliseconds)."""
    rabbit.start("--processes", "2", "--queue", f"{rabbit.q}.raw")
    rabbit.wait_for_consumers([f"{rabbit.q}.raw"])
    wait_until(
        lambda: "worker 0 pinned" in rabbit.logtext() and "worker 1 pinned" in rabbit.logtext(),
        60,
        rabbit.logtext,
    )
    time.sleep(1.0)  # both have reported ready
    connection, channel = _channel(rabbit.url)
    try:
        for i in range(2000):
            channel.basic_publish(
                "", f"{rabbit.q}.raw", b"task %d" % i, pika.BasicProperties(delivery_mode=2)
            )
    finally:
        connection.close()
    rabbit.wait_for_lines(2000)
    assert rabbit.stop() == 0
    lines = rabbit.lines()
    assert sorted(line.split(" ", 1)[1] for line in lines) == sorted(
        f"task {i}" for i in range(2000)
    )
    per_worker = collections.Counter(line.split(" ", 1)[0] for line in lines)
    assert len(per_worker) == 2 and min(per_worker.values()) > 200  # both workers took a share


def test_what_fastq_publishes_is_a_standard_amqp_message(rabbit):
    message_id = rabbit.app.record.send(42)
    connection, channel = _channel(rabbit.url)
    try:
        method, props, body = channel.basic_get(rabbit.q, auto_ack=True)
    finally:
        connection.close()
    assert method is not None
    assert props.delivery_mode == 2 and props.message_id == message_id
    assert props.content_type == "application/msgpack"
    # any msgpack reader: [id, task, args, enqueued_at, ...]
    envelope = msgspec.msgpack.decode(body)
    assert envelope[:3] == [message_id, rabbit.app.record.name, [42]]


def test_rabbitmq_restarted_mid_run_loses_nothing(rabbit):
    q = _enqueue(rabbit, 20_000, "slow")
    rabbit.start("--processes", "2", "--queue", q)
    rabbit.wait_for_lines(3000)
    with rabbitmq_stopped():  # started again however the block ends
        time.sleep(2)
    rabbit.wait_for_distinct(20_000, timeout=180)
    assert rabbit.stop() == 0
    assert set(rabbit.lines()) == {str(i) for i in range(20_000)}  # at least once: some twice
    assert rabbit.depth(q) == 0
    assert "reconnected to RabbitMQ" in rabbit.logtext()


def _close_consuming_connections(pid: int, reason: str) -> int:
    """``rabbitmqctl close_connection`` for the consuming connections of process ``pid``."""
    out = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "client_properties", "--quiet"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pids = [line.split()[0] for line in out.splitlines() if f'"fastq stream {pid}"' in line]
    for connection in pids:
        subprocess.run(["rabbitmqctl", "close_connection", connection, reason], check=True)
    return len(pids)


def test_the_consuming_connection_closed_by_rabbitmq_loses_nothing(rabbit):
    """RabbitMQ closes only the consuming connection (aiormq's lives on): both are made again,
    what the closed one held comes back, and every message is processed."""
    q = _enqueue(rabbit, 20_000, "slow")
    proc = rabbit.start("--processes", "2", "--queue", q)
    rabbit.wait_for_lines(3000)
    assert _close_consuming_connections(proc.pid, "fastq test: consuming connection closed") == 1
    rabbit.wait_for_distinct(20_000, timeout=180)
    assert rabbit.stop() == 0
    assert set(rabbit.lines()) == {str(i) for i in range(20_000)}  # at least once: some twice
    assert rabbit.depth(q) == 0
    log = rabbit.logtext()
    assert "CONNECTION_FORCED - fastq test: consuming connection closed" in log
    assert "reconnected to RabbitMQ" in log


def test_a_supervisor_killed_mid_run_costs_nothing_after_a_restart(rabbit):
    q = _enqueue(rabbit, 10_000, "slow")
    first = rabbit.start("--processes", "2", "--queue", q)
    rabbit.wait_for_lines(2000)
    for p in rabbit.workers(first):
        p.kill()
    first.kill()  # SIGKILL: nothing acked for what it held; RabbitMQ gives it back
    first.wait()
    rabbit.procs.remove(first)
    rabbit.start("--processes", "2", "--queue", q)
    rabbit.wait_for_distinct(10_000)
    assert rabbit.stop() == 0
    assert set(rabbit.lines()) == {str(i) for i in range(10_000)}
    assert rabbit.depth(q) == 0


def test_two_supervisors_split_the_work_and_do_nothing_twice(rabbit):
    """Two hosts on one queue: each takes a share; with no fault, nothing runs twice."""
    for start in range(0, 10_000, 1000):
        rabbit.app.tagged.send_many((i,) for i in range(start, start + 1000))
    a = rabbit.start("--processes", "1", "--queue", f"{rabbit.q}.pair", "--prefetch", "50")
    b = rabbit.start("--processes", "1", "--queue", f"{rabbit.q}.pair", "--prefetch", "50")
    rabbit.wait_for_lines(10_000)
    assert rabbit.stop(a) == 0 and rabbit.stop(b) == 0
    numbers = collections.Counter(line.split()[0] for line in rabbit.lines())
    assert len(numbers) == 10_000 and set(numbers.values()) == {1}
    shares = collections.Counter(line.split()[1] for line in rabbit.lines())
    assert set(shares) == {str(a.pid), str(b.pid)} and min(shares.values()) > 1000


def test_a_killed_worker_hands_its_messages_on(rabbit):
    q = _enqueue(rabbit, 10_000, "slow")
    proc = rabbit.start("--processes", "2", "--queue", q)
    rabbit.wait_for_lines(2000)
    rabbit.workers(proc)[0].kill()
    rabbit.wait_for_distinct(10_000)
    assert rabbit.stop() == 0
    assert set(rabbit.lines()) == {str(i) for i in range(10_000)}
    assert "exited with -9" in rabbit.logtext()


def test_the_password_never_reaches_an_error(amqp_url):
    import fastq
    from fastq.broker import open_broker

    broker = open_broker("amqp://guest:s3cret-pw@127.0.0.1:1/")
    with pytest.raises(fastq.BrokerConnectionError) as info:
        import asyncio

        asyncio.run(broker.open())
    assert "s3cret-pw" not in str(info.value) and "***" in str(info.value)


def test_queue_depth_and_fastq_stats(rabbit):
    import asyncio
    import json

    _enqueue(rabbit, 300)

    async def depth():
        try:
            return await rabbit.app.app.queue_depth(rabbit.q)
        finally:
            await rabbit.app.app.broker.close()

    d = asyncio.run(depth())
    assert (d.ready, d.unacked, d.dead, d.consumers) == (300, 0, 0, 0)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastq",
            "stats",
            f"{rabbit.module}:app",
            "--queue",
            rabbit.q,
            "--json",
        ],
        cwd=rabbit.dir,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert json.loads(out)[rabbit.q]["ready"] == 300


TOPOLOGY = """
import os
import fastq

app = fastq.App("amqp-topology", broker={url!r})
OUT = {out!r}
Q = {q!r}

def _record(line: bytes) -> None:
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line)
    os.close(fd)

@app.task(queue=Q + ".topic", exchange=Q + ".x", exchange_kind="topic", routing_key="orders.*",
          kind="io")
async def order(n: int) -> None:
    _record(b"order %d\\n" % n)

@app.consumer(Q + ".topic-raw", exchange=Q + ".x", exchange_kind="topic", routing_key="orders.*",
              kind="io")
async def order_raw(body: bytes) -> None:
    _record(b"topic-raw %s\\n" % (body if body == b"c" else b"envelope"))

@app.consumer(Q + ".f1", exchange=Q + ".fan", exchange_kind="fanout", kind="io")
async def f1(body: bytes) -> None:
    _record(b"f1 %s\\n" % body)

@app.consumer(Q + ".f2", exchange=Q + ".fan", exchange_kind="fanout", kind="io")
async def f2(body: bytes) -> None:
    _record(b"f2 %s\\n" % body)

@app.consumer(Q + ".h", exchange=Q + ".hx", exchange_kind="headers",
              binding_arguments={{"x-match": "all", "kind": "invoice"}}, kind="io")
async def invoices(body: bytes) -> None:
    _record(b"h %s\\n" % body)

@app.task(queue=Q + ".quorum", quorum=True, delivery_limit=5, kind="io")
async def replicated(n: int) -> None:
    _record(b"quorum %d\\n" % n)

@app.task(queue=Q + ".sac", single_active_consumer=True, kind="io")
async def one_at_a_time(n: int) -> None:
    _record(b"sac %d %d\\n" % (n, os.getppid()))
"""

TOPOLOGY_QUEUES = [".topic", ".topic-raw", ".f1", ".f2", ".h", ".quorum", ".sac"]


@pytest.fixture
def topology(tmp_path, amqp_url):
    r = Rabbit(tmp_path, amqp_url)
    r.module = f"amqp_topo_{r.q.replace('-', '_')}"
    (tmp_path / f"{r.module}.py").write_text(
        textwrap.dedent(TOPOLOGY.format(url=amqp_url, out=str(r.out), q=r.q))
    )
    r.app = __import__(r.module)
    yield r
    connection, channel = _channel(amqp_url)
    try:
        for suffix in TOPOLOGY_QUEUES:
            channel.queue_delete(r.q + suffix)
            channel.queue_delete(r.q + suffix + ".dlq")
        for x in (".x", ".fan", ".hx"):
            channel.exchange_delete(r.q + x)
    finally:
        connection.close()
    r.close()


def test_exchanges_of_every_kind_route_to_their_queues(topology):
    r = topology
    queues = [arg for s in TOPOLOGY_QUEUES[:5] for arg in ("--queue", r.q + s)]
    proc = r.start("--processes", "1", *queues)
    r.wait_for_consumers([r.q + s for s in TOPOLOGY_QUEUES[:5]])  # declared and bound
    r.app.order.send(1)  # the task publishes to its exchange with its routing key
    connection, channel = _channel(r.url)
    try:
        channel.confirm_delivery()
        persistent = pika.BasicProperties(delivery_mode=2)
        channel.basic_publish(r.q + ".x", "orders.created", b"c", persistent)
        channel.basic_publish(r.q + ".x", "invoices.created", b"nobody binds this", persistent)
        for i in range(10):
            channel.basic_publish(r.q + ".fan", "", b"%d" % i, persistent)
        channel.basic_publish(
            r.q + ".hx",
            "",
            b"invoice",
            pika.BasicProperties(delivery_mode=2, headers={"kind": "invoice"}),
        )
        channel.basic_publish(
            r.q + ".hx",
            "",
            b"receipt",
            pika.BasicProperties(delivery_mode=2, headers={"kind": "receipt"}),
        )
    finally:
        connection.close()
    # both topic queues get the task's message and "c" (which the task's queue dead-letters:
    # it is no envelope); 10 per fanout queue; the invoice, not the receipt
    r.wait_for_lines(1 + 2 + 20 + 1)
    wait_until(lambda: r.depth(r.q + ".topic.dlq") >= 1, 30, r.logtext, interval=0.1)
    assert r.stop(proc) == 0
    assert collections.Counter(r.lines()) == collections.Counter(
        ["order 1", "topic-raw envelope", "topic-raw c", "h invoice"]
        + [f"f{k} {i}" for k in (1, 2) for i in range(10)]
    )


def test_quorum_and_single_active_consumer_queues(topology):
    r = topology
    r.app.replicated.send_many((i,) for i in range(50))
    for start in range(0, 2000, 1000):
        r.app.one_at_a_time.send_many((i,) for i in range(start, start + 1000))
    types = subprocess.run(
        ["rabbitmqctl", "list_queues", "name", "type", "--quiet"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"{r.q}.quorum\tquorum" in types
    a = r.start("--processes", "1", "--queue", r.q + ".quorum", "--queue", r.q + ".sac")
    b = r.start("--processes", "1", "--queue", r.q + ".sac")
    r.wait_for_lines(50 + 2000)
    assert r.stop(a) == 0 and r.stop(b) == 0
    sac = [line.split() for line in r.lines() if line.startswith("sac ")]
    assert sorted(int(n) for _, n, _ in sac) == list(range(2000))
    assert len({pid for _, _, pid in sac}) == 1  # one consumer had them all
    # autosize's larger prefetch did not make a new consumer (that would hand the queue over)
    assert "has a single active consumer: its prefetch stays" in r.logtext()
    assert sorted(line for line in r.lines() if line.startswith("quorum")) == sorted(
        f"quorum {i}" for i in range(50)
    )


def test_a_queue_declared_otherwise_is_a_clear_error(topology):
    import asyncio

    import fastq
    from fastq.broker import QueueOptions, open_broker

    connection, channel = _channel(topology.url)
    try:
        channel.queue_declare(topology.q + ".sac", durable=True)  # classic, no arguments
    finally:
        connection.close()

    async def declare():
        broker = open_broker(topology.url)
        broker.configure(topology.q + ".sac", QueueOptions(single_active_consumer=True))
        await broker.open()
        try:
            await broker.declare(topology.q + ".sac")
        finally:
            await broker.close()

    with pytest.raises(fastq.ConfigError, match="exists with other settings"):
        asyncio.run(declare())
