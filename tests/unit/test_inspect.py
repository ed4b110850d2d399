"""fastq inspect's socket, in-process: owner-only permissions, a stale socket removed, a silent
supervisor reported within the timeout, replies of other apps left out, and the JSON log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest

from fastq import logs
from fastq.engine import inspect


def _reply(app: str = "shop:app") -> inspect.Reply:
    return inspect.Reply(pid=os.getpid(), app=app, uptime=1.5)


def _serving(directory: str, answer, asks):
    """Run a Server on a loop in a thread while ``asks()`` runs; its result."""
    result = {}

    async def main():
        server = inspect.Server(answer, str(directory))
        await server.start()
        result["modes"] = (
            stat.S_IMODE(os.stat(directory).st_mode),
            stat.S_IMODE(os.stat(server.path).st_mode),
        )
        result["asked"] = await asyncio.to_thread(asks)
        await server.close()
        result["left"] = os.listdir(directory)

    asyncio.run(main())
    return result


def test_the_socket_is_owner_only_and_answers_then_goes(tmp_path):
    directory = tmp_path / "fastq-inspect"
    result = _serving(directory, _reply, lambda: inspect.ask_all("shop:app", 2, str(directory)))
    assert result["modes"] == (0o700, 0o600)
    assert result["asked"] == [_reply()]
    assert result["left"] == []


def test_replies_of_another_app_are_left_out(tmp_path):
    result = _serving(tmp_path, _reply, lambda: inspect.ask_all("other:app", 2, str(tmp_path)))
    assert result["asked"] == []


def test_a_stale_socket_of_a_dead_supervisor_is_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    path = tmp_path / f"{int(dead.stdout)}.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays; nobody listens
    assert inspect.ask_all("shop:app", 2, str(tmp_path)) == []
    assert not path.exists()


def test_a_supervisor_that_does_not_answer_is_reported_within_the_timeout(tmp_path):
    path = tmp_path / f"{os.getpid()}.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))
        s.listen(1)  # accepted by the kernel, never answered
        (reply,) = inspect.ask_all("shop:app", 0.2, str(tmp_path))
    assert reply == inspect.Reply(pid=os.getpid(), error="did not answer within 0.2 s")
    assert inspect.describe(reply) == f"supervisor pid {os.getpid()}: did not answer within 0.2 s\n"


def test_no_runtime_dir_means_no_supervisor(tmp_path):
    assert inspect.ask_all("shop:app", 1, str(tmp_path / "none")) == []


def test_json_log_lines_carry_the_extra_fields():
    record = logging.LogRecord(
        "fastq.engine.pump", logging.WARNING, __file__, 1, "dead letter %s", ("m1",), None
    )
    record.queue, record.message_id = "orders", "m1"
    line = json.loads(logs.JsonFormatter().format(record))
    assert set(line) == {"time", "level", "pid", "logger", "message", "queue", "message_id"}
    assert (line["level"], line["logger"], line["message"], line["queue"]) == (
        "WARNING",
        "fastq.engine.pump",
        "dead letter m1",
        "orders",
    )
    assert line["pid"] == os.getpid()


def test_json_log_lines_carry_the_traceback():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["exception"].endswith("ValueError: boom")


@pytest.fixture(autouse=True)
def _no_threads_left():
    before = threading.active_count()
    yield
    assert threading.active_count() <= before


def test_a_report_carries_workers_queues_and_the_latest_autosize_decisions():
    from fastq.engine.statistics import QueueStatistics, SupervisorStatistics, WorkerStatistics

    class Supervisor:
        def statistics(self):
            return SupervisorStatistics(
                queues={
                    "orders": QueueStatistics(concurrency=8, prefetch=40, in_flight=3, settled=90)
                },
                handler_slots_per_worker=4,
                workers=(
                    WorkerStatistics(
                        index=0, pid=os.getpid(), cpu=1, ready=True, in_flight=3, starts=2
                    ),
                ),
                decisions=tuple((1e9 + i, "orders", f"reason {i}") for i in range(12)),
            )

    r = inspect.report(Supervisor(), "shop:app", started=0.0, done={0: 90})
    (w,) = r.workers
    assert (w.pid, w.cpu, w.in_flight, w.tasks_done, w.restarts) == (os.getpid(), 1, 3, 90, 1)
    assert w.rss_bytes is not None and w.rss_bytes > 0
    assert r.queues == [
        inspect.QueueReport(name="orders", concurrency=8, prefetch=40, in_flight=3, settled=90)
    ]
    assert [d.reason for d in r.decisions] == [f"reason {i}" for i in range(2, 12)]  # the last 10
    text = inspect.describe(r)
    assert text.startswith(f"supervisor pid {os.getpid()} of shop:app, up ")
    assert "  autosize 2001-09-09T01:46:51+00:00 orders: reason 11\n" in text
