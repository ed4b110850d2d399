"""fastq inspect against a live `fastq worker` (SQLite, 2 processes, JSON logs): its workers and
their counts, a worker's restart, a supervisor stopped (SIGSTOP) reported within the timeout,
and once it stopped, its socket gone and the command's one-line error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import uuid

import psutil
import pytest

from fastq.engine import inspect
from fastq.testing import wait_until

APP = """
import fastq

app = fastq.App("inspected", broker={url!r})

@app.task(queue="orders")
def record(n: int) -> None:
    pass
"""


@pytest.fixture
def tree(tmp_path):
    name = f"inspected_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(APP.format(url=f"sqlite:///{tmp_path}/q.db"))
    )
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    log = open(tmp_path / "worker.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastq", "worker", f"{name}:app", "--processes", "2"]
        + ["--log-format", "json", "--no-autosize"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    sys.path.insert(0, str(tmp_path))
    module = __import__(name)
    tree = type("Tree", (), {})()
    tree.proc, tree.spec, tree.module, tree.env, tree.dir = (
        proc,
        f"{name}:app",
        module,
        env,
        tmp_path,
    )
    tree.sockets = runtime / "fastq-inspect"
    yield tree
    for p in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
        p.kill()
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.wait(30)
    log.close()
    sys.path.remove(str(tmp_path))


def ask(tree):
    return inspect.ask_all(tree.spec, 2, str(tree.sockets))


def cli(tree, *args):
    return subprocess.run(
        [sys.executable, "-m", "fastq", "inspect", tree.spec, *args],
        check=False,
        cwd=tree.dir,
        env=tree.env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_inspect_reports_a_live_supervisor_its_workers_and_their_counts(tree):
    # Given: a supervisor with 2 workers up
    wait_until(
        lambda: [len([w for w in r.workers if w.ready]) for r in ask(tree)] == [2],
        timeout=60,
        message=lambda: f"replies: {ask(tree)}",
    )
    # When: 10 messages ran
    for i in range(10):
        tree.module.record.send(i)
    wait_until(lambda: sum(w.tasks_done for w in ask(tree)[0].workers) == 10, timeout=60)
    # Then: the command says so, as JSON
    done = cli(tree, "--json")
    assert (done.returncode, done.stderr) == (0, "")
    (reply,) = json.loads(done.stdout)
    assert reply["pid"] == tree.proc.pid and reply["app"] == tree.spec and reply["error"] == ""
    children = {p.pid for p in psutil.Process(tree.proc.pid).children()}
    assert {w["pid"] for w in reply["workers"]} <= children
    assert sorted(w["cpu"] for w in reply["workers"]) == [0, 1]
    assert sum(w["tasks_done"] for w in reply["workers"]) == 10
    assert all(w["rss_bytes"] > 0 and w["restarts"] == 0 for w in reply["workers"])
    (queue,) = reply["queues"]
    assert (queue["name"], queue["settled"], queue["in_flight"]) == ("orders", 10, 0)
    assert queue["concurrency"] >= 1 and queue["prefetch"] >= 1
    assert reply["uptime"] > 0
    text = cli(tree)
    assert text.returncode == 0
    assert text.stdout.startswith(f"supervisor pid {tree.proc.pid} of {tree.spec}, up ")
    # a worker SIGKILLed is started again, and counted
    os.kill(reply["workers"][0]["pid"], signal.SIGKILL)
    wait_until(
        lambda: (
            [w.restarts for w in ask(tree)[0].workers] == [1, 0]
            and all(w.ready for w in ask(tree)[0].workers)
        ),
        timeout=60,
    )
    # a supervisor that does not answer is reported, not waited on
    os.kill(tree.proc.pid, signal.SIGSTOP)
    try:
        silent = cli(tree, "--timeout", "0.5")
    finally:
        os.kill(tree.proc.pid, signal.SIGCONT)
    assert silent.returncode == 1
    assert silent.stdout == f"supervisor pid {tree.proc.pid}: did not answer within 0.5 s\n"
    # every log line is one JSON object
    lines = (tree.dir / "worker.log").read_text().splitlines()
    assert lines and all(
        set(json.loads(line)) >= {"time", "level", "pid", "logger", "message"} for line in lines
    )
    # a supervisor stopped (SIGTERM) takes its socket with it (a SIGKILLed one's is removed by
    # the next asker: tests/unit/test_inspect.py); then none answers
    tree.proc.terminate()
    assert tree.proc.wait(60) == 0
    gone = cli(tree)
    assert gone.returncode == 2
    assert gone.stderr == (
        f"fastq inspect: no running supervisor of {tree.spec} on this host (none answers in "
        f"{tree.sockets}); start one with fastq worker {tree.spec}\n"
    )
    assert os.listdir(tree.sockets) == []
