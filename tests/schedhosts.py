"""Supervisors as real processes for the scheduling tests (tests/integration/test_scheduling.py
on SQLite, tests/amqp/test_amqp_scheduling.py on RabbitMQ): an app module written for the test,
N `fastq worker` processes on one broker, and the lines their handlers write (O_APPEND, one write
per line) to count exactly."""

from __future__ import annotations

import itertools
import multiprocessing
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from fastq.testing import wait_until

APP = """
import os, time
import fastq
from fastq.schedule import tick_of

OUT = {out!r}


def _record(line: bytes) -> None:
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line)
    os.close(fd)


class Ticks(fastq.Middleware):
    # a periodic message's id carries its tick: one line per run, with the supervisor's pid
    def before_process(self, message):
        if message.handler == "tick":
            _record(b"tick %r %d\\n" % (tick_of(message.message_id), os.getppid()))


app = fastq.App("sched-{name}", broker={url!r}, middleware=[Ticks()], result_store={store!r})


@app.periodic(every=1, catch_up={catch_up!r})
@app.task(name="tick", queue="{q}.ticks", kind="io")
async def tick() -> None:
    pass


@app.task(name="later", queue="{q}.later", kind="io")
async def later(due: float) -> None:
    _record(b"later %r %r\\n" % (due, time.time()))


@app.task(name="once", queue="{q}.once", kind="io", unique=True)
async def once(n: int) -> None:
    _record(b"once %d\\n" % n)


def send_once(barrier, ids) -> None:  # a producer process of the unique test
    barrier.wait()
    ids.put(once.send(1))
"""


class Hosts:
    """`fastq worker sched_app:app` processes (each a supervisor with one worker)."""

    def __init__(
        self,
        tmp_path: Path,
        url: str,
        *,
        q: str = "s",
        catch_up: str = "latest",
        store: str | None = None,
    ) -> None:
        self.dir, self.out = tmp_path, tmp_path / "out.txt"
        source = APP.format(out=str(self.out), url=url, q=q, catch_up=catch_up, store=store, name=q)
        (tmp_path / "sched_app.py").write_text(textwrap.dedent(source))
        sys.path.insert(0, str(tmp_path))
        sys.modules.pop("sched_app", None)
        import sched_app

        self.app = sched_app
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def start(self) -> int:
        """One more supervisor; its index."""
        i = len(self.procs)
        log = self.dir / f"worker{i}.log"
        self.logs.append(log)
        with open(log, "ab") as f:
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "fastq", "worker", "sched_app:app", "--processes", "1"],
                    cwd=self.dir,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
        return i

    def log(self, i: int) -> str:
        return self.logs[i].read_text() if self.logs[i].exists() else ""

    def wait_for_log(self, i: int, text: str, timeout: float = 60) -> None:
        def found() -> bool:
            assert self.procs[i].poll() is None, f"supervisor {i} exited: {self.log(i)[-3000:]}"
            return text in self.log(i)

        wait_until(found, timeout, lambda: self.log(i)[-3000:])

    def lines(self, kind: str) -> list[list[str]]:
        text = self.out.read_text() if self.out.exists() else ""
        return [line.split()[1:] for line in text.splitlines() if line.startswith(kind + " ")]

    def ticks(self) -> list[float]:
        return [float(words[0]) for words in self.lines("tick")]

    def wait_for_lines(self, kind: str, n: int, timeout: float = 60) -> None:
        wait_until(
            lambda: len(self.lines(kind)) >= n,
            timeout,
            lambda: f"{len(self.lines(kind))} of {n} {kind} lines; log: {self.log(0)[-2000:]}",
        )

    def stop(self, i: int, signum: int = signal.SIGTERM) -> int:
        p = self.procs[i]
        p.send_signal(signum)
        return p.wait(60)

    def unique_sends(self, n: int) -> list[str]:
        """``once.send(1)`` from ``n`` processes at once (spawned, released by one barrier)."""
        ctx = multiprocessing.get_context("spawn")
        barrier, ids = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=self.app.send_once, args=(barrier, ids)) for _ in range(n)]
        for p in procs:
            p.start()
        got = [ids.get(timeout=60) for _ in range(n)]
        for p in procs:
            p.join(30)
        assert [p.exitcode for p in procs] == [0] * n
        return got

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        sys.path.remove(str(self.dir))
        sys.modules.pop("sched_app", None)


def assert_one_run_per_tick(ticks: list[float]) -> None:
    """Each tick ran once, and none is missing between the first and the last."""
    assert len(ticks) == len(set(ticks)), f"ticks that ran more than once: {sorted(ticks)}"
    ordered = sorted(ticks)
    gaps = [b - a for a, b in itertools.pairwise(ordered) if b - a != 1.0]
    assert gaps == [], f"ticks missing: {ordered}"
