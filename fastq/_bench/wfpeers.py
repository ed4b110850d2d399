"""The peers of ``python -m fastq bench workflow``: Celery's ``chord`` (a group of 1,000 and a
callback that takes their results) and ``chain`` of 4, and Dramatiq's ``group`` (its results
waited for) and ``pipeline`` of 4; RabbitMQ brokers, Redis result backends.

Each peer runs its own worker with a process per core (``celery worker -c N``, its prefork
default; ``dramatiq --processes N``, its threads default), the same handlers as fastq's rows
(~1 ms of pure Python for a fanned-out element, noop for a chain's steps), its defaults
otherwise. Its worker starts, runs a small warm-up canvas, and only then the clock starts; it
stops when the fan-in ran (Celery: the chord's callback; Dramatiq: the producer read every
result) or the last chain's last step ran: each of those appends one byte to a file that the
bench watches. A peer that is not installed, or whose broker or backend is not there, is
skipped with a line that says so. The worker machinery (``System``, its log tail, the process
trees' CPU) is the peers bench's (``fastq._bench.workers``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastq._bench import workers
from fastq._bench.workers import System, _tail, _tree_cpu
from fastq.broker.base import mask_url
from fastq.testing import terminate

#: the peers' result backend
REDIS = "redis://127.0.0.1:6379/0"
#: the peers' broker when fastq's own rows do not run on RabbitMQ
AMQP = "amqp://guest:guest@127.0.0.1:5672//"

COMMON = """
import os
_fd = os.open({out!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def done():
    os.write(_fd, b"x")


def burn(n):
    x = 0
    for i in range(n):
        x += i * i
    return x
"""

CELERY = """
from celery import Celery, chain, chord

app = Celery("wfpeers", broker={url!r}, backend={redis!r})
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    task_default_queue={queue!r},
)


@app.task
def work(i):
    burn({burn})
    return i


@app.task
def join(results):
    assert len(results) == len(set(results))
    done()
    return len(results)


@app.task
def step(n):
    return n


@app.task
def last(n):
    done()
    return n


def fan(n):
    chord(work.s(i) for i in range(n))(join.s())


def chains(n):
    for i in range(n):
        chain(step.s(i), step.s(), step.s(), last.s()).apply_async()
"""

DRAMATIQ = """
import dramatiq
from dramatiq import group, pipeline
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

broker = RabbitmqBroker(url={pika_url!r})
broker.add_middleware(Results(backend=RedisBackend(url={redis!r})))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name={queue!r}, store_results=True)
def work(i):
    burn({burn})
    return i


@dramatiq.actor(queue_name={queue!r})
def step(n):
    return n


@dramatiq.actor(queue_name={queue!r})
def last(n):
    done()
    return n


def fan(n):
    g = group(work.message(i) for i in range(n)).run()
    results = list(g.get_results(block=True, timeout=600_000))
    assert sorted(results) == list(range(n))
    done()


def chains(n):
    for i in range(n):
        pipeline([step.message(i), step.message(), step.message(), last.message()]).run()
"""


def systems(cores: int) -> list[System]:
    """Celery and Dramatiq as the peers bench starts them (a process per core)."""
    base = {s.key: s for s in workers.systems(cores)}
    return [
        System(
            "Celery chord/chain",
            CELERY,
            [*base["celery"].command, "-c", str(cores)],
            ("celery", "redis"),
        ),
        System(
            "Dramatiq group/pipeline",
            DRAMATIQ,
            base["dramatiq"].command,
            ("dramatiq", "pika", "redis"),
        ),
    ]


def pika_url(url: str) -> str:
    """``url`` as pika reads it: the default vhost ``/`` spelled ``%2F`` (pika reads ``//``
    as the vhost named "")."""
    parts = urllib.parse.urlsplit(url)
    if parts.path in ("", "/", "//"):
        return urllib.parse.urlunsplit(parts._replace(path="/%2F"))
    return url


def reachable(url: str, default_port: int) -> bool:
    parts = urllib.parse.urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port or default_port), timeout=2).close()
    except OSError:
        return False
    return True


def present(cores: int, amqp: str, log: Callable[[str], None]) -> list[System]:
    """The peers that can run here; a line for each that cannot."""
    if not reachable(amqp, 5672) or not reachable(REDIS, 6379):
        log(f"no RabbitMQ at {mask_url(amqp)} or no Redis at {REDIS}: the peers are skipped")
        return []
    out = []
    for s in systems(cores):
        if s.installed():
            out.append(s)
        else:
            log(f"{s.name} is not installed (pip install 'fastq-engine[bench]'): skipped")
    return out


class Peer:
    """One peer's module and worker for one round: ``fan`` and ``chains`` time one scenario each
    on the running worker."""

    def __init__(self, system: System, work: Path, amqp: str, burn: int, tag: str) -> None:
        self.system, self.work, self.amqp = system, work, amqp
        self.name = "peer_" + system.name.split()[0].lower()
        self.queue = f"fq-wfpeers-{tag}-{self.name}"
        self.out = work / f"{self.name}.out"
        source = textwrap.dedent(COMMON.format(out=str(self.out)))
        source += textwrap.dedent(
            system.source.format(
                url=amqp, pika_url=pika_url(amqp), redis=REDIS, queue=self.queue, burn=burn
            )
        )
        (work / f"{self.name}.py").write_text(source)
        if str(work) not in sys.path:
            sys.path.insert(0, str(work))
        sys.modules.pop(self.name, None)
        self.module: Any = importlib.import_module(self.name)
        self.log = open(work / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            system.command_for("", self.queue),
            cwd=work,
            env={**os.environ, "PYTHONPATH": str(work)},
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.cpu: list[float] = []

    def wait(self, count: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while self.out.stat().st_size < count:
            if (code := self.proc.poll()) is not None:
                raise RuntimeError(
                    f"{self.system.name}'s worker exited with code {code}; its log ends: "
                    f"{_tail(self.log.name)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.system.name}: {self.out.stat().st_size} of {count} in {timeout:g} s; "
                    f"its log ends: {_tail(self.log.name)}"
                )
            time.sleep(0.002)

    def timed(self, start: Callable[[], None], count: int) -> float:
        """Seconds from ``start()`` until ``count`` bytes were appended (the file emptied
        first); the worker's CPU over the same span goes to ``cpu``."""
        import psutil

        self.out.write_bytes(b"")
        root = [psutil.Process(self.proc.pid)]
        cpu0 = _tree_cpu(root)[0]
        t0 = time.perf_counter()
        start()
        self.wait(count)
        took = time.perf_counter() - t0
        self.cpu.append(_tree_cpu(root)[0] - cpu0)
        return took

    def warm(self) -> None:
        """Its worker is up and has run both canvases once."""
        self.timed(lambda: self.module.fan(8), 1)
        self.timed(lambda: self.module.chains(4), 4)

    def fan(self, n: int) -> float:
        return self.timed(lambda: self.module.fan(n), 1)

    def chains(self, n: int) -> float:
        return self.timed(lambda: self.module.chains(n), n)

    def close(self) -> None:
        terminate(self.proc)
        self.log.close()
        sys.modules.pop(self.name, None)
        delete_queues(self.amqp, [self.queue + s for s in ("", ".DQ", ".XQ")])


def delete_queues(url: str, names: list[str]) -> None:
    import aiormq

    async def run() -> None:
        connection = await aiormq.connect(url)
        for name in names:
            channel = await connection.channel()
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        await connection.close()

    with contextlib.suppress(Exception):
        asyncio.run(run())
