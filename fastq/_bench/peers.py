"""The pipelines users write today, on the same RabbitMQ, each with its own worker and its
defaults: Celery's ``chain`` (``celery worker``: prefork, one process per core, prefetch x 4) and
Dramatiq's ``pipeline`` (``dramatiq``: a process per core, 8 threads each), and Celery's
``.delay().get()`` with a Redis result backend (127.0.0.1:6379, database 15) for ``call``.

Each stage-c handler appends one byte to a file; a chain's rate is counted from the first run of a
stage-a handler (the first one in each worker process touches a file: its time is the start) to
the last output, so a worker's start-up is not charged to it (fastq's clock, stricter, starts
when its workers are ready). The clock does not start at the first output: the stage-a messages
are all queued first and run first, so the first chain ends when most of the work is done (that
window, used before 2026-12-07, overstated a three-stage chain's rate up to three times).
Peers that are not installed (``pip install 'fastq-engine[bench]'``) are skipped with a line
that says so.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastq.testing import terminate

REDIS_URL = "redis://127.0.0.1:6379/15"

#: what both peers' apps have: ~1 ms of CPU, the start of the work (the first stage-a run of
#: each process touches STARTED: one system call per process) and a chain's last stage's output
COMMON = """
def burn(n):
    x = 0
    for i in range(n):
        x += i * i
    return x


_started = False


def started():
    global _started
    if not _started:
        _started = True
        fd = os.open(STARTED, os.O_WRONLY | os.O_CREAT)  # made by the first: its time counts
        os.close(fd)


def done():
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, b"x")
    os.close(fd)
"""

CELERY = """
import os
from celery import Celery, chain

app = Celery("peer", broker={url!r}, backend={backend!r})
app.conf.update(task_default_queue={queue!r}, broker_connection_retry_on_startup=True,
                worker_hijack_root_logger=False)
OUT, STARTED = {out!r}, {started!r}

{common}

@app.task(ignore_result=True)
def noop_a(n):
    started()
    return n


@app.task(ignore_result=True)
def noop_b(n):
    return n


@app.task(ignore_result=True)
def noop_c(n):
    done()


@app.task(ignore_result=True)
def cpu_a(n):
    started()
    burn({burn})
    return n


@app.task(ignore_result=True)
def cpu_b(n):
    burn({burn})
    return n


@app.task(ignore_result=True)
def cpu_c(n):
    burn({burn})
    done()


@app.task
def echo(n):
    return n


def send(scenario, n):
    a, b, c = (globals()[f"{{scenario}}_{{s}}"] for s in "abc")
    for i in range(n):
        chain(a.s(i), b.s(), c.s()).apply_async()
"""

DRAMATIQ = """
import os
import dramatiq
from dramatiq import pipeline
from dramatiq.brokers.rabbitmq import RabbitmqBroker

dramatiq.set_broker(RabbitmqBroker(url={url!r}))
OUT, STARTED = {out!r}, {started!r}
Q = {queue!r}

{common}

@dramatiq.actor(queue_name=Q + "a")
def noop_a(n):
    started()
    return n


@dramatiq.actor(queue_name=Q + "b")
def noop_b(n):
    return n


@dramatiq.actor(queue_name=Q + "c")
def noop_c(n):
    done()


@dramatiq.actor(queue_name=Q + "ca")
def cpu_a(n):
    started()
    burn({burn})
    return n


@dramatiq.actor(queue_name=Q + "cb")
def cpu_b(n):
    burn({burn})
    return n


@dramatiq.actor(queue_name=Q + "cc")
def cpu_c(n):
    burn({burn})
    done()


def send(scenario, n):
    a, b, c = (globals()[f"{{scenario}}_{{s}}"] for s in "abc")
    for i in range(n):
        pipeline([a.message(i), b.message(), c.message()]).run()
"""


def installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def purge(url: str, prefix: str, names: tuple[str, ...] = ()) -> None:
    """Delete the queues of a run (fastq's, by the pipeline app's names, and the peers')."""
    from fastq._bench.amqp import _purge

    stages = [f"{k}-{s}" for k in ("noop", "cpu") for s in "abc"]
    _purge(url, [prefix + n for n in (*stages, "echo", *names)], delete=True)


class Peer:
    """One peer's app module in ``workdir`` and its worker process."""

    def __init__(self, name: str, source: str, workdir: Path, command: list[str]) -> None:
        self.name, self.dir, self.out = name, workdir, workdir / f"{name}.out"
        self.module = f"peer_{name}"
        (workdir / f"{self.module}.py").write_text(textwrap.dedent(source))
        sys.path.insert(0, str(workdir))
        self.mod = importlib.import_module(self.module)
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = open(workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed by close()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command, cwd=self.dir, stdout=self.log, stderr=subprocess.STDOUT
        )

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)
            self.proc = None

    def outputs(self) -> int:
        return self.out.stat().st_size if self.out.exists() else 0

    def chain(self, scenario: str, n: int, timeout: float = 600) -> float:
        """Chains per second, from the first stage-a run to the last output."""
        self.out.unlink(missing_ok=True)
        started = self.out.with_suffix(".started")
        started.unlink(missing_ok=True)
        self.mod.send(scenario, n)
        self.start()
        try:
            deadline = time.monotonic() + timeout
            while self.outputs() < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name}: {self.outputs()} of {n} chains in {timeout} s"
                    )
                time.sleep(0.005)
            last = time.time()
        finally:
            self.stop()
        return n / max(last - started.stat().st_mtime, 1e-9)

    def close(self) -> None:
        self.stop()
        self.log.close()
        sys.path.remove(str(self.dir))


def measure(
    url: str, runs: int, chains: dict[str, int], calls: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    from fastq._bench import _burn_iterations, call_figures, chain_figures, timed_calls

    burn = _burn_iterations()
    cores = str(len(os.sched_getaffinity(0)))
    results: list[dict[str, Any]] = []
    prefix = f"fq-peer-{int(time.time())}-"
    with tempfile.TemporaryDirectory(prefix="fastq-peers-") as tmp:
        work = Path(tmp)
        if installed("celery", "redis"):
            peer = Peer(
                "celery",
                CELERY.format(
                    url=url,
                    backend=REDIS_URL,
                    queue=prefix + "celery",
                    out=str(work / "celery.out"),
                    started=str(work / "celery.started"),
                    burn=burn,
                    common=COMMON,
                ),
                work,
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "peer_celery",
                    "worker",
                    "--loglevel",
                    "WARNING",
                    "-c",
                    cores,
                ],
            )
            try:
                r: dict[str, Any] = {"system": "Celery chain (RabbitMQ, Redis results)"}
                for scenario, n in chains.items():
                    rates = [peer.chain(scenario, n) for _ in range(runs)]
                    log(f"celery chain {scenario}: {', '.join(f'{x:,.0f}' for x in rates)} msgs/s")
                    r.update(chain_figures(scenario, rates))
                peer.start()
                peer.mod.echo.delay(0).get(timeout=120)  # the worker is up
                echo = peer.mod.echo
                rounds = [
                    timed_calls(lambda i: echo.delay(i).get(timeout=60), calls) for _ in range(runs)
                ]
                log(f"celery call: {call_figures(rounds)}")
                r.update(call_figures(rounds))
                results.append(r)
            finally:
                peer.close()
                purge(url, prefix, ("celery",))
        else:
            log("Celery is not installed (pip install 'fastq-engine[bench]'): skipped")
        if installed("dramatiq", "pika"):
            peer = Peer(
                "dramatiq",
                DRAMATIQ.format(
                    url=url,
                    queue=prefix + "dq-",
                    out=str(work / "dramatiq.out"),
                    started=str(work / "dramatiq.started"),
                    burn=burn,
                    common=COMMON,
                ),
                work,
                [sys.executable, "-m", "dramatiq", "peer_dramatiq", "--processes", cores],
            )
            try:
                r = {"system": "Dramatiq pipeline (RabbitMQ)"}
                for scenario, n in chains.items():
                    rates = [peer.chain(scenario, n) for _ in range(runs)]
                    log(f"dramatiq pipeline {scenario}: {', '.join(f'{x:,.0f}' for x in rates)}")
                    r.update(chain_figures(scenario, rates))
                results.append(r)
            finally:
                peer.close()
                names = [f"dq-{s}" for s in ("a", "b", "c", "ca", "cb", "cc")]
                purge(
                    url, prefix, (*names, *(f"{n}.DQ" for n in names), *(f"{n}.XQ" for n in names))
                )
        else:
            log("Dramatiq is not installed (pip install 'fastq-engine[bench]'): skipped")
    return results
