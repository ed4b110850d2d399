"""A `fastq worker` process tree for the fault tests: an app of its own, the handlers' output
counted line by line, the worker processes found by psutil, the whole tree killed at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import psutil

from fastq.ring import sweep_dead_segments
from fastq.testing import wait_until

APP = """
import asyncio, os
import fastq

app = fastq.App("faults", broker={url!r})
OUT = {out!r}

def _record(line: bytes) -> None:
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line)
    os.close(fd)

@app.task(queue={q!r}, kind="io")
async def record(n: int) -> None:
    _record(b"%d\\n" % n)

@app.task(queue={q!r} + ".slow", kind="io")
async def slow(n: int) -> None:
    await asyncio.sleep(0.002)
    _record(b"%d\\n" % n)

@app.task(queue={q!r} + ".crawl", kind="io", concurrency=8)
async def crawl(n: int) -> None:
    await asyncio.sleep(0.02)  # 8 at once: 400 a second, whatever the machine
    _record(b"%d\\n" % n)
"""


class Tree:
    """One app (module ``faults_<id>`` in ``directory``) and the `fastq worker` trees run on it."""

    def __init__(self, directory: Path, url: str, extra: str = "") -> None:
        """``extra``: more of the app module (tasks of a test's own), appended to ``APP``."""
        self.dir, self.url, self.out = directory, url, directory / "out.txt"
        self.q = f"fq-fault-{uuid.uuid4().hex[:8]}"
        self.module = f"faults_{uuid.uuid4().hex[:8]}"
        (directory / f"{self.module}.py").write_text(
            textwrap.dedent(APP.format(url=url, out=str(self.out), q=self.q))
            + textwrap.dedent(extra)
        )
        sys.path.insert(0, str(directory))
        self.app = __import__(self.module)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def start(
        self, *args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        """``fastq worker`` on this app (in a session of its own, so that a test can kill the
        whole tree at once); ``prefix`` runs it under another command (``ip netns exec NS``)."""
        log = self.dir / f"worker-{len(self.procs)}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "fastq", "worker", f"{self.module}:app", *args],
                cwd=self.dir,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(self.dir), **(env or {})},
            )
        self.procs.append(proc)
        self.logs[proc.pid] = log
        return proc

    def logtext(self, proc: subprocess.Popen[bytes] | None = None) -> str:
        procs = [proc] if proc is not None else self.procs
        return "".join(self.logs[p.pid].read_text() for p in procs)[-4000:]

    def lines(self) -> list[str]:
        return self.out.read_text().split() if self.out.exists() else []

    def workers(self, proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
        """The worker processes of ``proc``'s tree (not multiprocessing's resource tracker)."""
        found = []
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "spawn_main" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return found

    def wait_for_workers(self, proc: subprocess.Popen[bytes], n: int, timeout: float = 60) -> None:
        def up() -> bool:
            assert proc.poll() is None, f"the supervisor exited: {self.logtext(proc)}"
            pinned = len(re.findall(r"worker \d+ pinned to cpu", self.logs[proc.pid].read_text()))
            return len(self.workers(proc)) >= n and pinned >= n

        wait_until(up, timeout, lambda: self.logtext(proc))

    def wait_for_distinct(self, n: int, timeout: float = 120) -> None:
        """Until ``n`` different lines: a message processed twice (at least once) counts once."""
        wait_until(
            lambda: len(set(self.lines())) >= n,
            timeout,
            lambda: f"{len(set(self.lines()))} of {n}; log: {self.logtext()}",
            interval=0.05,
        )

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 60) -> int:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout)
        self.procs.remove(proc)
        return code

    def kill_tree(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the supervisor, its workers and multiprocessing's resource tracker together
        (what the OOM killer or ``systemctl kill`` does)."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        self.procs.remove(proc)

    def close(self) -> None:
        for proc in list(self.procs):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(30)
        sweep_dead_segments()  # the rings of the trees killed whole (a supervisor would, at start)
        sys.path.remove(str(self.dir))
        sys.modules.pop(self.module, None)


def enqueue(tree: Tree, n: int, task: str = "record") -> None:
    fn = getattr(tree.app, task)
    for start in range(0, n, 1000):
        fn.send_many((i,) for i in range(start, min(n, start + 1000)))
