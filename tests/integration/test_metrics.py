"""Prometheus /metrics of a real `fastq worker` (SQLite, two worker processes), scraped over HTTP
after a run with retries and dead letters: every counter equals the exact count of the run."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from fastq.testing import terminate, wait_until

prometheus_parser = pytest.importorskip("prometheus_client.parser")

APP = """
import os
import fastq

app = fastq.App("metrics", broker="sqlite:///{db}")
MARKS = {marks!r}

@app.task(name="fine", queue="m.ok", kind="io")
async def fine(n: int) -> int:
    return n

@app.task(name="flaky", queue="m.flaky", kind="io", max_retries=2, retry_backoff=0.01)
async def flaky(n: int) -> None:
    mark = os.path.join(MARKS, str(n))
    if not os.path.exists(mark):  # the first attempt fails, the second passes
        open(mark, "w").close()
        raise RuntimeError("first attempt")

@app.task(name="doomed", queue="m.doomed", kind="io", max_retries=1, retry_backoff=0.01)
async def doomed(n: int) -> None:
    raise ValueError("never")
"""

#: (queue, task, outcome) -> the exact count of the run below
EXPECTED = {
    ("m.ok", "fine", "processed"): 20,
    ("m.flaky", "flaky", "processed"): 10,
    ("m.flaky", "flaky", "failed"): 5,
    ("m.flaky", "flaky", "retried"): 5,
    ("m.doomed", "doomed", "processed"): 6,
    ("m.doomed", "doomed", "failed"): 6,
    ("m.doomed", "doomed", "retried"): 3,
    ("m.doomed", "doomed", "dead"): 3,
    ("m.doomed", "", "dead"): 1,  # a body that is not an envelope: dead before any handler
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """name -> labels -> value, of every sample /metrics serves now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def _messages(samples) -> dict[tuple[str, str, str], int]:
    found = {}
    for labels, value in samples.get("fastq_messages_total", {}).items():
        d = dict(labels)
        found[(d["queue"], d["task"], d["outcome"])] = int(value)
    return found


@pytest.fixture
def worker(tmp_path: Path):
    (tmp_path / "marks").mkdir()
    (tmp_path / "metrics_app.py").write_text(
        textwrap.dedent(APP.format(db=tmp_path / "q.db", marks=str(tmp_path / "marks")))
    )
    sys.path.insert(0, str(tmp_path))
    import metrics_app

    port = _free_port()
    log = open(tmp_path / "worker.log", "ab")
    procs: list[subprocess.Popen[bytes]] = []

    def start() -> tuple[int, subprocess.Popen[bytes]]:
        p = subprocess.Popen(
            [sys.executable, "-m", "fastq", "worker", "metrics_app:app", "--processes", "2"]
            + ["--metrics", f"127.0.0.1:{port}"],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(p)
        return port, p

    yield metrics_app, start, lambda: (tmp_path / "worker.log").read_text()[-3000:]
    for p in procs:  # SIGTERM: the supervisor unlinks its rings on the way out
        if p.poll() is None:
            terminate(p)
    log.close()
    sys.path.remove(str(tmp_path))
    sys.modules.pop("metrics_app", None)


@pytest.mark.multiprocess
def test_counters_equal_the_exact_counts_of_a_run_with_retries_and_dead_letters(worker):
    app, start, logtext = worker
    from fastq.broker.base import Message

    # Given 20 fine messages, 5 that fail once, 3 that always fail, and one that is not a message
    app.fine.send_many((i,) for i in range(20))
    app.flaky.send_many((i,) for i in range(5))
    app.doomed.send_many((i,) for i in range(3))
    app.app.broker.publish_sync("m.doomed", [Message(b"\xc1 garbage", "garbage")])
    # When a worker with --metrics runs them
    port, proc = start()

    def counted() -> bool:
        assert proc.poll() is None, logtext()
        try:
            got = _messages(_scrape(port))
        except OSError:  # not serving yet
            return False
        return sum(got.values()) >= sum(EXPECTED.values())

    wait_until(counted, 60, logtext)
    samples = _scrape(port)
    # Then every counter equals the exact count, and each histogram counts the runs
    assert _messages(samples) == EXPECTED
    for queue, task, n in (
        ("m.ok", "fine", 20),
        ("m.flaky", "flaky", 10),
        ("m.doomed", "doomed", 6),
    ):
        key = (("queue", queue), ("task", task))
        assert samples["fastq_handler_seconds_count"][key] == n
        assert samples["fastq_enqueue_to_start_seconds_count"][key] == n
        assert samples["fastq_handler_seconds_bucket"][(("le", "+Inf"), *key)] == n
    assert sum(samples["fastq_worker_tasks_total"].values()) == 20 + 10 + 6 + 1
    # and the engine's gauges are there: one value per queue, per worker
    assert {dict(k)["queue"] for k in samples["fastq_concurrency"]} == {
        "m.ok",
        "m.flaky",
        "m.doomed",
    }
    assert len(samples["fastq_worker_resident_memory_bytes"]) == 2
    rss = samples["fastq_worker_resident_memory_bytes"].values()
    assert all(v > 0 for v in rss), rss  # read once a second: maybe while a worker starts

    def depth_read() -> bool:  # the broker's depths are read every few seconds
        depth = _scrape(port).get("fastq_broker_messages", {})
        return depth.get((("queue", "m.doomed"), ("state", "dead"))) == 4

    wait_until(depth_read, 15, logtext)

    # When a worker is SIGKILLed, its restart is counted by cause
    import psutil

    victim = next(
        c for c in psutil.Process(proc.pid).children() if "spawn_main" in " ".join(c.cmdline())
    )
    victim.kill()

    def restarted() -> bool:
        restarts = _scrape(port).get("fastq_worker_restarts_total", {})
        return {dict(k)["cause"]: v for k, v in restarts.items()} == {"died": 1}

    wait_until(restarted, 15, logtext)
    proc.terminate()
    assert proc.wait(30) == 0
