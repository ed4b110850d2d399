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
