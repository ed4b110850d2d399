"""Starts ``fastq worker`` on a workflow app written to a test's tmp_path (SQLite broker), and
stops it: the workflow tests' supervisor."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import psutil

from fastq.testing import wait_until


class Host:
    """``fastq worker module:app`` on ``tmp_path/<module>.py`` (``source`` formatted with
    ``db``, ``dir`` and ``q``, the steps' queue); ``self.app`` is the module, imported here too
    (the producer)."""

    def __init__(
        self, tmp_path: Path, module: str, source: str, *, processes: int = 2, q: str = "default"
    ) -> None:
        self.dir, self.module = tmp_path, module
        (tmp_path / f"{module}.py").write_text(
            textwrap.dedent(source).format(db=tmp_path / "q.db", dir=str(tmp_path), q=q)
        )
        sys.path.insert(0, str(tmp_path))
        self.app = __import__(module)
        self.processes = processes
        self.log = open(tmp_path / "worker.log", "ab")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastq", "worker", f"{self.module}:app",
             "--processes", str(self.processes), "--log-level", "info"],
            cwd=self.dir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

    def logtext(self) -> str:
        return (self.dir / "worker.log").read_text()[-3000:]

    def lines(self, name: str) -> list[str]:
        path = self.dir / name
        return path.read_text().split() if path.exists() else []

    def workers(self) -> list[psutil.Process]:
        assert self.proc is not None
        found = []
        for p in psutil.Process(self.proc.pid).children():
            try:
                if "spawn_main" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except psutil.NoSuchProcess:
                pass
        return found

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                assert self.proc.wait(60) == 0, self.logtext()
            finally:
                if self.proc.poll() is None:
                    self.proc.kill()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.log.close()
            sys.path.remove(str(self.dir))
            sys.modules.pop(self.module, None)


def check_tutorial(host: Host, run_id: str) -> Any:
    """The tutorial run ended as the tutorial says, on any broker: the cleanup (the one sink)
    saw the report and the notifications, every step done, the context, the three partitions
    at once (their wall time under the sum of their times), the cleanup once. Its status."""
    wf = host.app.wf
    out = wf.result(run_id, timeout=60)
    report = "; ".join(f"{c}=2000" for c in sorted(host.app.CATEGORIES))
    assert out == {"cleanup": f"cleaned after {report} and 2 notifications"}
    st = wf.status(run_id)
    assert {n: s.state for n, s in st.steps.items()} == dict.fromkeys(wf.steps, "done")
    assert st.context == {"partitions": 3, "notified": 2}
    parts = st.steps["process_partition"].elements
    wall = max(p.finished_at for p in parts) - min(p.started_at for p in parts)
    assert wall < sum(p.finished_at - p.started_at for p in parts) * 0.8
    assert host.lines("cleanup.txt") == [run_id]
    return st


def kill_a_worker_twice(host: Host, after: tuple[int, ...] = (250, 500)) -> None:
    """SIGKILL a worker once ``after[i]`` elements ran, for each i."""
    for ran in after:
        wait_until(lambda r=ran: len(host.lines("work.txt")) >= r, 60, host.logtext)
        victims = host.workers()
        assert victims, host.logtext()
        victims[0].send_signal(signal.SIGKILL)


def check_fan_in(host: Host, run_id: str, n: int = 1000) -> None:
    """The fan-out of ``n`` fanned in exactly: the sum, the join once, every element run (at
    least once) and recorded once, done."""
    assert host.app.wf.result(run_id, timeout=120) == {"join": sum(2 * i for i in range(n))}
    assert host.lines("join.txt") == ["join"]
    assert set(map(int, host.lines("work.txt"))) == set(range(n))
    elements = host.app.wf.status(run_id).steps["work"].elements
    assert [(e.index, e.state) for e in elements] == [(i, "done") for i in range(n)]
