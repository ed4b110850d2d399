"""Starts ``fastq worker`` on a workflow app written to a test's tmp_path (SQLite broker), and
stops it: the workflow tests' supervisor."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil


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
