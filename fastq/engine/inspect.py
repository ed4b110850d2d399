"""``fastq inspect``: each supervisor answers on a Unix socket of its own in the host's runtime
dir, and the command asks every one of them.

The socket is ``<runtime dir>/fastq-inspect/<pid>.sock`` (``$XDG_RUNTIME_DIR``, else
``/tmp/fastq-inspect-<uid>``): the directory is 0700 and the socket 0600, so only the user who
runs the supervisor may ask it. A connection gets one JSON document (``Reply``), then the
socket closes; nothing is read from the asker. A socket nobody listens on (its supervisor was
SIGKILLed) is removed by the next asker; one whose supervisor does not answer within the timeout
is reported as such, never waited on.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Mapping

import msgspec

logger = logging.getLogger(__name__)

#: seconds ``fastq inspect`` waits for one supervisor by default
TIMEOUT = 2.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


class WorkerReport(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    pid: int | None
    cpu: int | None
    ready: bool
    in_flight: int
    #: messages it finished (acked, retried, dead-lettered, returned) since the supervisor began
    tasks_done: int
    rss_bytes: int | None
    #: times it was started again (0: never)
    restarts: int


class QueueReport(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    concurrency: int
    prefetch: int
    in_flight: int
    settled: int


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    at: float
    queue: str
    reason: str


class Reply(msgspec.Struct, frozen=True, kw_only=True):
    """What one supervisor says of itself; ``error`` set (and nothing else) when it did not."""

    pid: int
    app: str = ""
    uptime: float = 0.0
    workers: list[WorkerReport] = []
    queues: list[QueueReport] = []
    #: the autosize controller's latest decisions, newest last
    decisions: list[Decision] = []
    error: str = ""


def runtime_dir() -> str:
    """Where the supervisors of this host and user keep their inspect sockets."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "fastq-inspect")
    return os.path.join(tempfile.gettempdir(), f"fastq-inspect-{os.getuid()}")


def rss_bytes(pid: int | None) -> int | None:
    """Resident memory of ``pid`` (Linux /proc), None when it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def report(supervisor: object, app_spec: str, started: float, done: Mapping[int, int]) -> Reply:
    """A ``Reply`` from ``supervisor.statistics()`` (``fastq.engine.statistics``)."""
    stats = supervisor.statistics()  # type: ignore[attr-defined]
    return Reply(
        pid=os.getpid(),
        app=app_spec,
        uptime=time.monotonic() - started,
        workers=[
            WorkerReport(
                index=w.index,
                pid=w.pid,
                cpu=w.cpu,
                ready=w.ready,
                in_flight=w.in_flight,
                tasks_done=done.get(w.index, 0),
                rss_bytes=rss_bytes(w.pid),
                restarts=max(0, w.starts - 1),
            )
            for w in stats.workers
        ],
        queues=[
            QueueReport(
                name=name,
                concurrency=q.concurrency,
                prefetch=q.prefetch,
                in_flight=q.in_flight,
                settled=q.settled,
            )
            for name, q in stats.queues.items()
        ],
        decisions=[Decision(at=t, queue=q, reason=r) for t, q, r in stats.decisions[-10:]],
    )


class Server:
    """The supervisor's side: ``start`` binds the socket, ``close`` removes it."""

    def __init__(self, answer: Callable[[], Reply], directory: str | None = None) -> None:
        self.answer = answer
        self.directory = directory or runtime_dir()
        self.path = os.path.join(self.directory, f"{os.getpid()}.sock")
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen; a directory that cannot be made is logged, and the supervisor runs on."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            os.chmod(self.directory, 0o700)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a pid reused after a SIGKILL left its socket here
            old = os.umask(0o177)  # the socket is made 0600, never wider for a moment
            try:
                self.server = await asyncio.start_unix_server(self._handle, self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
        except OSError as e:
            logger.warning("fastq inspect will not reach this supervisor: %s: %s", self.path, e)

    async def _handle(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(msgspec.json.encode(self.answer()))
            await writer.drain()
        except Exception as e:  # noqa: BLE001 - an asker that went away costs nothing
            logger.debug("fastq inspect: %s", e)
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
            self.server = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ask(path: str, timeout: float) -> Reply | None:
    """One supervisor's reply; None when nothing listens there (a stale socket is removed)."""
    pid = int(os.path.basename(path).partition(".")[0])
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
                s.settimeout(max(0.001, deadline - time.monotonic()))
        except (ConnectionRefusedError, FileNotFoundError):
            if not _alive(pid):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            return None
        except TimeoutError:
            return Reply(pid=pid, error=f"did not answer within {timeout:g} s")
        except OSError as e:
            return Reply(pid=pid, error=f"could not be asked: {e}")
    try:
        return msgspec.json.decode(b"".join(chunks), type=Reply)
    except msgspec.DecodeError as e:
        return Reply(pid=pid, error=f"answered what does not decode: {e}")


def ask_all(app_spec: str, timeout: float = TIMEOUT, directory: str | None = None) -> list[Reply]:
    """The replies of the supervisors of ``app_spec`` on this host, and of those that did not
    answer (whose app cannot be told), by pid."""
    directory = directory or runtime_dir()
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".sock"))
    except FileNotFoundError:
        return []
    replies = []
    for name in names:
        if not name.partition(".")[0].isdigit():
            continue
        r = ask(os.path.join(directory, name), timeout)
        if r is not None and (r.error or r.app == app_spec):
            replies.append(r)
    return replies


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.1f}"


def describe(r: Reply) -> str:
    """A reply as lines for a terminal."""
    if r.error:
        return f"supervisor pid {r.pid}: {r.error}\n"
    lines = [f"supervisor pid {r.pid} of {r.app}, up {r.uptime:.1f} s"]
    lines.append(
        f"  {'worker':>6} {'pid':>8} {'core':>5} {'ready':>5} {'in flight':>9} {'done':>9} "
        f"{'rss MiB':>8} {'restarts':>8}"
    )
    for w in r.workers:
        lines.append(
            f"  {w.index:>6} {w.pid or '-':>8} {'-' if w.cpu is None else w.cpu:>5} "
            f"{'yes' if w.ready else 'no':>5} {w.in_flight:>9} {w.tasks_done:>9} "
            f"{_mib(w.rss_bytes):>8} {w.restarts:>8}"
        )
    lines.append(
        f"  {'queue':<24} {'concurrency':>11} {'prefetch':>8} {'in flight':>9} {'settled':>9}"
    )
    for q in r.queues:
        lines.append(
            f"  {q.name:<24} {q.concurrency:>11} {q.prefetch:>8} {q.in_flight:>9} {q.settled:>9}"
        )
    for d in r.decisions:
        when = dt.datetime.fromtimestamp(d.at, dt.UTC).isoformat(timespec="seconds")
        lines.append(f"  autosize {when} {d.queue}: {d.reason}")
    return "\n".join(lines) + "\n"
