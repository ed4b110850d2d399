"""``python -m fastq bench --broker amqp://... --peers``: the work-queue scenarios through fastq
with its defaults (``fastq worker app:app``, autosize on, nothing set by hand) and, in the same
run, through Dramatiq, taskiq, FastStream and Celery, each with its own worker and defaults, and
through two hand-written consumers in as many processes as there are cores: aio-pika (prefetch
100, one ack per message) and aiormq (prefetch 1,000, ``basic.ack multiple`` every 100
deliveries or 5 ms).

Each system gets the same handler (noop; ``asyncio.sleep(0.005)``, or ``time.sleep`` where the
peer runs handlers in threads or processes; ~1 ms of pure Python), the same count of messages,
queued before its worker starts (each by the system's own producer; the raw consumers read raw
bodies), and the same counting: every handler appends one byte to a file. A rate runs from the
first completion to the last (start-up is nobody's); CPU per message is the whole process tree's
user + system time over the same span (psutil; RabbitMQ's own is left out: it is everyone's).
Systems are interleaved within each round; medians of ``runs``. Peers that are not installed
(``pip install 'fastq-engine[bench]'``) are skipped with a line that says so.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: scenario label -> (handler, messages)
SCENARIOS: dict[str, tuple[str, int]] = {
    "noop, 40,000": ("noop", 40_000),
    "I/O 5 ms, 5,000": ("io", 5_000),
    "I/O 5 ms, 40,000": ("io", 40_000),
    "CPU ~1 ms, 5,000": ("cpu", 5_000),
}
#: the short names ``--scenarios`` takes
SCENARIO_KEYS: dict[str, str] = dict(zip(("noop40k", "io5k", "io40k", "cpu5k"), SCENARIOS))
HELD = "fastq, held 100/1,000"
#: the short names ``--systems`` takes, in the order the systems run
SYSTEM_KEYS = (
    "fastq",
    "fastq-held",
    "dramatiq",
    "taskiq",
    "faststream",
    "celery",
    "aio-pika",
    "aiormq",
)
#: what every app has: the count of completions, ~1 ms of CPU
COMMON = """
import asyncio
import os
_fd = os.open({out!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def done():
    os.write(_fd, b"x")


def burn():
    x = 0
    for i in range({burn}):
        x += i * i
    return x


async def work(scenario):  # the raw consumers' handler
    if scenario == "io":
        await asyncio.sleep(0.005)
    elif scenario == "cpu":
        burn()
    done()
"""

FASTQ = """
import asyncio
import fastq

app = fastq.App("peers", broker={url!r})


@app.task(queue={queue!r} + "noop", kind="io")
async def noop(n: int) -> None:
    done()


@app.task(queue={queue!r} + "io", kind="io")
async def io(n: int) -> None:
    await asyncio.sleep(0.005)
    done()


@app.task(queue={queue!r} + "cpu", kind="cpu")
def cpu(n: int) -> None:
    burn()
    done()


def fill(scenario, n):
    task = globals()[scenario]
    for start in range(0, n, 1000):
        task.send_many((i,) for i in range(start, min(n, start + 1000)))
"""

DRAMATIQ = """
import time
import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

dramatiq.set_broker(RabbitmqBroker(url={url!r}))


@dramatiq.actor(queue_name={queue!r} + "noop")
def noop(n):
    done()


@dramatiq.actor(queue_name={queue!r} + "io")
def io(n):
    time.sleep(0.005)
    done()


@dramatiq.actor(queue_name={queue!r} + "cpu")
def cpu(n):
    burn()
    done()


def fill(scenario, n):
    actor = globals()[scenario]
    for i in range(n):
        actor.send(i)
"""

CELERY = """
import time
from celery import Celery

app = Celery("peers", broker={url!r})
app.conf.update(broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)


@app.task(ignore_result=True, queue={queue!r} + "noop")
def noop(n):
    done()


@app.task(ignore_result=True, queue={queue!r} + "io")
def io(n):
    time.sleep(0.005)
    done()


@app.task(ignore_result=True, queue={queue!r} + "cpu")
def cpu(n):
    burn()
    done()


def fill(scenario, n):
    task = globals()[scenario]
    with app.producer_or_acquire() as producer:
        for i in range(n):
            task.apply_async((i,), producer=producer)
"""

TASKIQ = """
import asyncio
import os
from taskiq_aio_pika import AioPikaBroker

SCENARIO = os.environ.get("PEER_SCENARIO", "noop")
broker = AioPikaBroker({url!r}, queue_name={queue!r} + SCENARIO)


@broker.task(task_name="noop")
async def noop(n: int) -> None:
    done()


@broker.task(task_name="io")
async def io(n: int) -> None:
    await asyncio.sleep(0.005)
    done()


@broker.task(task_name="cpu")
def cpu(n: int) -> None:
    burn()
    done()


def fill(scenario, n):
    async def run():
        await broker.startup()
        task = globals()[scenario]
        for i in range(n):
            await task.kiq(i)
        await broker.shutdown()

    asyncio.run(run())
"""

FASTSTREAM = """
import asyncio
import os
import time
from faststream import FastStream
from faststream.rabbit import RabbitBroker, RabbitQueue

SCENARIO = os.environ.get("PEER_SCENARIO", "noop")
broker = RabbitBroker({url!r})
app = FastStream(broker)


@broker.subscriber(RabbitQueue({queue!r} + SCENARIO, durable=True))
async def handle(body: int) -> None:
    await work(SCENARIO)


def fill(scenario, n):
    raw_fill({url!r}, {queue!r} + scenario, n)
"""

#: the hand-written consumers: one process each, started once per core
AIO_PIKA = """
import asyncio
import os
import aio_pika

SCENARIO = os.environ.get("PEER_SCENARIO", "noop")


async def main():
    connection = await aio_pika.connect({url!r})
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=100)
    queue = await channel.declare_queue({queue!r} + SCENARIO, durable=True)

    async def on_message(message):
        await work(SCENARIO)
        await message.ack()

    await queue.consume(on_message)
    await asyncio.Future()


def fill(scenario, n):
    raw_fill({url!r}, {queue!r} + scenario, n)


if __name__ == "__main__":
    asyncio.run(main())
"""

AIORMQ = """
import asyncio
import os
import aiormq

SCENARIO = os.environ.get("PEER_SCENARIO", "noop")


async def main():
    connection = await aiormq.connect({url!r})
    channel = await connection.channel()
    await channel.basic_qos(prefetch_count=1000)
    last = [0, 0]  # the newest tag, the newest acked

    async def ack_now():
        if last[0] > last[1]:
            last[1] = last[0]
            await channel.basic_ack(last[0], multiple=True)

    async def acker():
        while True:
            await asyncio.sleep(0.005)
            await ack_now()

    async def on_message(message):
        await work(SCENARIO)
        last[0] = max(last[0], message.delivery.delivery_tag)
        if last[0] - last[1] >= 100:
            await ack_now()

    asyncio.get_running_loop().create_task(acker())
    await channel.basic_consume({queue!r} + SCENARIO, on_message)
    await asyncio.Future()


def fill(scenario, n):
    raw_fill({url!r}, {queue!r} + scenario, n)


if __name__ == "__main__":
    asyncio.run(main())
"""

#: the embedded default's peer: huey with its SQLite storage and its process consumer ({url} is
#: the SQLite file)
HUEY = """
import time
from huey import SqliteHuey

huey = SqliteHuey(filename={url!r})


@huey.task()
def noop(n):
    done()


@huey.task()
def io(n):
    time.sleep(0.005)
    done()


@huey.task()
def cpu(n):
    burn()
    done()


def fill(scenario, n):
    task = globals()[scenario]
    for i in range(n):
        task(i)
"""


#: raw bodies for the consumers that read them, pipelined with confirms
RAW_FILL = """
def raw_fill(url, queue, n):
    import asyncio
    import aiormq

    async def run():
        connection = await aiormq.connect(url)
        channel = await connection.channel()
        await channel.queue_declare(queue, durable=True)
        for start in range(0, n, 1000):
            await asyncio.gather(*[
                channel.basic_publish(b"%d" % i, routing_key=queue,
                                      properties=aiormq.spec.Basic.Properties(delivery_mode=2))
                for i in range(start, min(n, start + 1000))
            ])
        await connection.close()

    asyncio.run(run())
"""


class System:
    """One system's app module, how its worker starts, and what it needs installed."""

    def __init__(
        self,
        name: str,
        source: str,
        command: list[str],
        needs: tuple[str, ...],
        procs: int = 1,
        only: tuple[str, ...] = (),
        key: str = "",
        per_handler: dict[str, list[str]] | None = None,
    ) -> None:
        self.name, self.source, self.command, self.needs, self.procs = (
            name,
            source,
            command,
            needs,
            procs,
        )
        #: the scenarios it runs in (empty: all)
        self.only = only
        #: the short name ``--systems`` takes
        self.key = key or _module_name(self)[len("peer_") :].replace("_", "-")
        #: arguments appended to the command for one handler (noop, io, cpu) only
        self.per_handler = per_handler or {}

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.needs)

    def command_for(self, handler: str, queue: str) -> list[str]:
        """The worker's command line for ``handler``'s scenario, reading ``queue``."""
        return [c.replace("{q}", queue) for c in self.command] + self.per_handler.get(handler, [])


def _celery_io_pool() -> list[str]:
    """Celery's pool for the I/O scenarios, as a user with I/O-bound tasks runs it: not the
    prefork default (a process per core runs two 5 ms sleeps at a time here: ~300/s, 130 s for
    40,000 messages, which measures a misconfiguration, not Celery), but the built-in threads
    pool with 100 threads (``time.sleep`` releases the GIL; 100 is fastq's own formula's
    ceiling for I/O handlers). Celery's docs show ``-P gevent -c 1000`` for I/O; on this
    machine (gevent 26.9, greenlet 3.5, Celery 5.7, Python 3.11) that worker ran 16-47 msgs/s
    on the 5 ms sleep and stalled on noop, so it would not be a fair row either."""
    return ["-P", "threads", "-c", "100"]


def systems(cores: int) -> list[System]:
    py = sys.executable
    return [
        System(
            "fastq", FASTQ, [py, "-m", "fastq", "worker", "peer_fastq:app", "--queue", "{q}"], ()
        ),
        # the same engine held by hand at the best setting of the autosize bench: what sizing
        # from the first second is measured against (>= 90% on a burst)
        System(
            HELD,
            FASTQ,
            [
                py,
                "-m",
                "fastq",
                "worker",
                "peer_fastq:app",
                "--queue",
                "{q}",
                "--concurrency",
                "100",
                "--prefetch",
                "1000",
            ],
            (),
            only=("I/O 5 ms, 5,000",),
            key="fastq-held",
        ),
        System(
            "Dramatiq",
            DRAMATIQ,
            [py, "-m", "dramatiq", "peer_dramatiq", "--processes", str(cores), "--queues", "{q}"],
            ("dramatiq", "pika"),
        ),
        System(
            "taskiq",
            TASKIQ,
            [py, "-m", "taskiq", "worker", "peer_taskiq:broker", "--workers", str(cores)],
            ("taskiq", "taskiq_aio_pika"),
        ),
        System(
            "FastStream",
            FASTSTREAM,
            [
                py,
                "-m",
                "faststream",
                "run",
                "peer_faststream:app",
                "--workers",
                str(cores),
                "--log-level",
                "warning",
            ],
            ("faststream", "aio_pika"),
        ),
        System(
            "Celery",
            CELERY,
            [
                py,
                "-m",
                "celery",
                "-A",
                "peer_celery",
                "worker",
                "-Q",
                "{q}",
                "--loglevel",
                "WARNING",
            ],
            ("celery",),
            # noop and CPU: Celery's default, the prefork pool with a process per core (what
            # Celery gives CPU-bound work); I/O: see _celery_io_pool
            per_handler={
                "noop": ["-c", str(cores)],
                "cpu": ["-c", str(cores)],
                "io": _celery_io_pool(),
            },
        ),
        System(
            f"aio-pika, {cores} procs",
            AIO_PIKA,
            [py, "peer_aio_pika.py"],
            ("aio_pika",),
            procs=cores,
        ),
        System(
            f"aiormq, batched acks, {cores} procs",
            AIORMQ,
            [py, "peer_aiormq.py"],
            ("aiormq",),
            procs=cores,
        ),
    ]


def huey_system(cores: int) -> System:
    return System(
        "huey",
        HUEY,
        [
            sys.executable,
            "-m",
            "huey.bin.huey_consumer",
            "peer_huey.huey",
            "-k",
            "process",
            "-w",
            str(cores),
        ],
        ("huey",),
    )


def _module_name(system: System) -> str:
    return "peer_" + system.name.split(",")[0].lower().replace("-", "_")


def _tail(path: str, lines: int = 5) -> str:
    """The last lines of a worker's log, on one line."""
    try:
        with open(path, "rb") as f:
            text = f.read()[-4000:].decode(errors="replace")
    except OSError as e:
        return f"(unreadable: {e})"
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


class _Sentinel:
    """A connection to RabbitMQ without heartbeats, open across one measurement: if it is gone
    at the end, RabbitMQ restarted (or dropped its connections) meanwhile and the figure is
    void. This machine is shared, and some tests restart RabbitMQ."""

    def __init__(self, url: str) -> None:
        self.connection: Any = None
        try:
            pika = importlib.import_module("pika")  # Dramatiq's client, in the bench extra
            params = pika.URLParameters(url)
            params.heartbeat = 0
            self.connection = pika.BlockingConnection(params)
        except ImportError:  # no pika: no check
            pass

    def intact(self) -> bool:
        if self.connection is None:
            return True
        try:
            self.connection.process_data_events(0)
            return bool(self.connection.is_open)
        except Exception:  # noqa: BLE001 - any error here means the connection went
            return False

    def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.close()


def _wait_for_rabbitmq(url: str, timeout: float = 300) -> None:
    """Return once RabbitMQ takes connections again (or ``timeout`` seconds passed)."""
    import socket
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((parts.hostname, parts.port or 5672), timeout=1).close()
            time.sleep(5)  # its queues and vhosts come up a little after the port
            return
        except OSError:
            time.sleep(1)


def _tree_cpu(procs: list[Any]) -> tuple[float, float]:
    """User + system seconds of the whole trees under ``procs``, and of the roots alone (for
    fastq, the supervisor)."""
    import psutil

    total = roots = 0.0
    for root in procs:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in tree:
            try:
                t = p.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system
            if p is root:
                roots += t.user + t.system
    return total, roots


class Run:
    """One system through one scenario: its queue filled, its worker started, every completion
    waited for, its worker stopped."""

    def __init__(self, work: Path, url: str, queue: str, burn: int) -> None:
        self.work, self.url, self.queue, self.burn = work, url, queue, burn

    def queue_of(self, system: System) -> str:
        """The system's own queue prefix: each declares its queues its own way."""
        return f"{self.queue}{_module_name(system)}-"

    def delete(self, system: System) -> None:
        """Delete the system's queues, whatever their arguments (and Dramatiq's .DQ, .XQ)."""
        import asyncio

        import aiormq

        async def run() -> None:
            connection = await aiormq.connect(self.url)
            for handler in ("noop", "io", "cpu"):
                for suffix in ("", ".dlq", ".DQ", ".XQ"):
                    channel = await connection.channel()
                    try:
                        await channel.queue_delete(self.queue_of(system) + handler + suffix)
                    except Exception:  # noqa: BLE001, S110 - not there
                        pass
            await connection.close()

        asyncio.run(run())

    def module(self, system: System) -> Any:
        name = _module_name(system)
        out = self.work / f"{name}.out"
        source = textwrap.dedent(COMMON.format(out=str(out), burn=self.burn)) + RAW_FILL
        queue = self.queue_of(system)
        source += textwrap.dedent(system.source.format(url=self.url, queue=queue))
        (self.work / f"{name}.py").write_text(source)
        if str(self.work) not in sys.path:
            sys.path.insert(0, str(self.work))
        sys.modules.pop(name, None)
        return importlib.import_module(name), out

    def measure(
        self,
        system: System,
        scenario: str,
        n: int,
        intact: Callable[[], bool] = lambda: True,
    ) -> tuple[float, float, float]:
        """Messages per second (first completion to last), and CPU µs per message of the whole
        process tree and of its root alone (fastq's supervisor). ``intact`` is asked twice a
        second while waiting; when it says no (RabbitMQ restarted: a restart can take the
        queue's messages with it), the run ends at once with a RuntimeError."""
        import psutil

        looked = [time.monotonic()]

        def check() -> None:
            if time.monotonic() - looked[0] >= 0.5:
                looked[0] = time.monotonic()
                if not intact():
                    raise RuntimeError("RabbitMQ dropped its connections during the run")

        module, out = self.module(system)
        out.write_bytes(b"")
        env = {**os.environ, "PEER_SCENARIO": scenario}
        module.fill(scenario, n)
        command = system.command_for(scenario, self.queue_of(system) + scenario)
        log = open(self.work / f"{_module_name(system)}.log", "ab")  # noqa: SIM115
        procs = [
            subprocess.Popen(command, cwd=self.work, env=env, stdout=log, stderr=subprocess.STDOUT)
            for _ in range(system.procs)
        ]
        ps = [psutil.Process(p.pid) for p in procs]
        kids: list[Any] = []
        try:
            deadline = time.monotonic() + 600
            while not out.stat().st_size:
                if (
                    code := next((c for p in procs if (c := p.poll()) is not None), None)
                ) is not None:
                    raise RuntimeError(
                        f"{system.name}'s worker exited with code {code} before its first "
                        f"message; its log ends: {_tail(log.name)}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{system.name} processed nothing in 600 s; its log ends: {_tail(log.name)}"
                    )
                check()
                time.sleep(0.002)
            first, (cpu0, root0), done0 = time.perf_counter(), _tree_cpu(ps), out.stat().st_size
            while (count := out.stat().st_size) < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{system.name}: {count} of {n} in 600 s; its log ends: {_tail(log.name)}"
                    )
                check()
                time.sleep(0.002)
            last, (cpu1, root1) = time.perf_counter(), _tree_cpu(ps)
        finally:
            for root in ps:
                with contextlib.suppress(psutil.Error):
                    kids += root.children(recursive=True)
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            # a child its parent left behind (a pool's process) must not run into the next
            # system's time
            for kid in kids:
                with contextlib.suppress(psutil.Error):
                    kid.kill()
            log.close()
        handled = max(n - done0, 1)
        return (
            handled / max(last - first, 1e-9),
            1e6 * (cpu1 - cpu0) / handled,
            1e6 * (root1 - root0) / handled,
        )


def _attempts(
    run: Run, system: System, handler: str, n: int, where: str, log: Callable[[str], None]
) -> tuple[float, float, float] | None:
    """One system's figures in one scenario, tried up to five times: a failure (its worker
    exited, or processed nothing, or RabbitMQ went away mid-run) is logged, and the next try
    waits for RabbitMQ. None when every try failed."""
    for attempt in range(1, 6):
        sentinel = None
        try:
            run.delete(system)
            sentinel = _Sentinel(run.url)
            got = run.measure(system, handler, n, sentinel.intact)
            if not sentinel.intact():
                raise RuntimeError("RabbitMQ dropped its connections during the run")
            return got
        except Exception as e:  # noqa: BLE001 - a peer's or RabbitMQ's, logged; the rest run
            log(f"{where}: {system.name} failed (try {attempt} of 5): {type(e).__name__}: {e}")
            _wait_for_rabbitmq(run.url)
        finally:
            if sentinel is not None:
                sentinel.close()
    return None


def measure(
    url: str,
    runs: int,
    log: Callable[[str], None],
    only_systems: tuple[str, ...] = (),
    only_scenarios: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """Every present system (or those keyed in ``only_systems``) through every scenario (or
    those keyed in ``only_scenarios``), ``runs`` rounds, systems interleaved in each."""
    from fastq._bench import _burn_iterations

    cores = len(os.sched_getaffinity(0))
    burn = _burn_iterations()
    queue = f"fq-peers-{int(time.time())}-"
    present = []
    for s in systems(cores):
        if only_systems and s.key not in only_systems:
            continue
        if s.installed():
            present.append(s)
            if s.per_handler:
                log(
                    f"{s.name}'s worker: "
                    + "; ".join(f"{h}: {' '.join(a)}" for h, a in s.per_handler.items())
                )
        else:
            log(f"{s.name} is not installed (pip install 'fastq-engine[bench]'): skipped")
    labels = [SCENARIO_KEYS[k] for k in only_scenarios] if only_scenarios else list(SCENARIOS)
    figures: dict[tuple[str, str], list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="fastq-peers-") as tmp:
        run = Run(Path(tmp), url, queue, burn)
        try:
            for r in range(runs):
                for label in labels:
                    handler, n = SCENARIOS[label]
                    for system in present:  # interleaved: a noisy minute hits everyone
                        if system.only and label not in system.only:
                            continue
                        got = _attempts(
                            run, system, handler, n, f"round {r + 1}/{runs} {label}", log
                        )
                        if got is None:  # the others still run
                            continue
                        figures.setdefault((label, system.name), []).append(got)
                        log(
                            f"round {r + 1}/{runs} {label}: {system.name} {got[0]:,.0f} msgs/s, "
                            f"{got[1]:.0f} µs CPU/msg (tree), {got[2]:.0f} (root process)"
                        )
        finally:
            for system in present:
                run.delete(system)
            sys.path[:] = [p for p in sys.path if p != tmp]
    results = []
    for label in labels:
        row: dict[str, Any] = {"scenario": label, "systems": {}}
        for system in present:
            rounds = figures.get((label, system.name), [])
            if not rounds:
                continue
            row["systems"][system.name] = {
                "msgs_per_s": statistics.median(g[0] for g in rounds),
                "cpu_us_per_msg": statistics.median(g[1] for g in rounds),
                "root_cpu_us_per_msg": statistics.median(g[2] for g in rounds),
                "runs_msgs_per_s": [g[0] for g in rounds],
                "runs_cpu_us_per_msg": [g[1] for g in rounds],
                "runs_root_cpu_us_per_msg": [g[2] for g in rounds],
            }
        results.append(row)
    return results


def render(results: list[dict[str, Any]]) -> str:
    names = list(dict.fromkeys(n for row in results for n in row["systems"]))
    head = f"  {'scenario':<18}" + "".join(f" {n[:22]:>22}" for n in names)
    lines = [head]
    for row in results:
        fq = row["systems"].get("fastq", {}).get("msgs_per_s", 0.0)
        cells = []
        for n in names:
            rate = row["systems"].get(n, {}).get("msgs_per_s", 0.0)
            ratio = "" if n == "fastq" or not rate or not fq else f" ({fq / rate:.2f}x)"
            cells.append(f" {f'{rate:,.0f}/s{ratio}' if rate else '-':>22}")
        lines.append(f"  {row['scenario']:<18}" + "".join(cells))
    for row in results:
        key = next((k for k, v in SCENARIO_KEYS.items() if v == row["scenario"]), "")
        label = "CPU µs, " + key
        got = row["systems"]
        lines.append(
            f"  {label[:18]:<18}"
            + "".join(
                f" {got[n]['cpu_us_per_msg']:>22.0f}" if n in got else f" {'-':>22}" for n in names
            )
        )
    lines.append("  (fastq's ratio to each in brackets; CPU: the whole process tree, per message)")
    for row in results:
        if "fastq" in row["systems"]:
            lines.append(
                f"  fastq's supervisor alone, {row['scenario']}: "
                f"{row['systems']['fastq']['root_cpu_us_per_msg']:.1f} µs CPU per message"
            )
    return "\n".join(lines)


def main(
    *,
    url: str,
    runs: int,
    json_path: str | None,
    only_systems: tuple[str, ...] = (),
    only_scenarios: tuple[str, ...] = (),
) -> int:
    from fastq._bench import log, write_json
    from fastq._bench.ring import machine
    from fastq.broker.base import mask_url

    info = machine()
    log(f"fastq bench --peers on {mask_url(url)}: {info['cpu']}, {info['usable_cores']} cores")
    results = measure(url, runs, log, only_systems, only_scenarios)
    print(
        f"fastq bench --peers (RabbitMQ at {mask_url(url)}) on {info['cpu']} "
        f"({info['usable_cores']} cores), Python {info['python']}; medians of {runs} rounds, "
        "systems interleaved; RabbitMQ shares the cores"
    )
    print(render(results))
    write_json(json_path, "peers", info, results)
    return 0
