"""Workflows on the real RabbitMQ, their runs in a SQLite result store: the supervisor records a
step's outcome there (the messages it made ready kept in the store's outbox), publishes them with
confirm, then acks. The SQLite tests' apps (tests/integration/test_workflows.py) on queues of
each test's own: Cloacina's tutorial (exact, partitions overlapping), a fan-out of 1,000 with a
worker SIGKILLed twice (the join once), a failing step resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid

import msgspec
import pika
import pytest

import fastq
from fastq.testing import wait_until
from tests.integration.test_workflows import CATALOG, FANOUT, FLAKY
from tests.integration.wfhost import Host, check_fan_in, check_tutorial, kill_a_worker_twice


@pytest.fixture
def host(tmp_path, request, amqp_url):
    module, source = request.param
    q = f"fq-wf-{uuid.uuid4().hex[:8]}"
    broker = repr(amqp_url) + ', result_store="sqlite:///{db}"'
    for old in ('"sqlite:///{db}?lease=5"', '"sqlite:///{db}"'):
        if old in source:
            source = source.replace(old, broker)
            break
    h = Host(tmp_path, f"amqp_{module}", source, q=q)
    h.start()
    yield h
    try:
        h.close()
    finally:
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        try:
            channel = connection.channel()
            for name in (q, f"{q}.dlq"):
                channel.queue_delete(name)
        finally:
            connection.close()


@pytest.mark.parametrize("host", [("wf_catalog", CATALOG)], indirect=True)
def test_the_cloacina_tutorial_on_rabbitmq(host):
    wf = host.app.wf
    run_id = wf.start(10_000)
    check_tutorial(host, run_id)
    # nothing is left in the store's outbox: every ready step was published, then let go
    assert host.app.app.result_store._db().execute(
        "SELECT count(*) FROM fastq_run_outbox"
    ).fetchone() == (0,)


@pytest.mark.parametrize("host", [("wf_fanout", FANOUT)], indirect=True)
def test_a_fan_out_of_1000_on_rabbitmq_with_a_worker_sigkilled_twice(host):
    run_id = host.app.wf.start(1000)
    kill_a_worker_twice(host)
    check_fan_in(host, run_id)


@pytest.mark.parametrize("host", [("wf_flaky", FLAKY)], indirect=True)
def test_a_failing_step_on_rabbitmq_is_resumed(host):
    wf = host.app.wf
    run_id = wf.start()
    with pytest.raises(fastq.WorkflowFailed) as failed:
        wf.result(run_id, timeout=60)
    assert failed.value.failed == {
        "parse": "RuntimeError: the feed is malformed (after 3 attempts)"
    }
    assert failed.value.skipped == ["load"]
    (host.dir / "fixed").touch()
    assert wf.resume(run_id) == ["parse", "load"]
    assert wf.result(run_id, timeout=60) == {"cleanup": "None audited"}
    assert sorted(host.lines("runs.txt")) == sorted(
        ["fetch", "parse", "parse", "parse", "audit", "cleanup", "parse", "load"]
    )


@pytest.mark.parametrize("host", [("wf_fanout", FANOUT)], indirect=True)
def test_on_rabbitmq_a_sigkilled_supervisor_and_an_unpublished_outbox_lose_no_step(host):
    import time

    from fastq.workflow import run

    wf, store = host.app.wf, host.app.app.result_store
    # Given a fan-out under way whose supervisor is SIGKILLed, and another started
    first = wf.start(1000)
    wait_until(lambda: len(host.lines("work.txt")) >= 300, 60, host.logtext)
    assert host.proc is not None
    host.proc.send_signal(signal.SIGKILL)
    host.proc.wait(10)
    # and a run recorded in the store whose root step was never published (a producer that
    # died between its transaction and its publish): it waits in the outbox
    second, made = "r-outboxed", []
    args = msgspec.msgpack.encode([10])
    store.run_transaction(
        lambda tx: run.start(tx, second, "fan", wf.graph(), args, time.time()), outbox=made
    )
    assert [o.queue for _, o in made] == [host.app.Q]
    assert _pending(store) == [i for i, _ in made]
    host.start()
    # Then both runs complete exactly: RabbitMQ redelivers what the dead one held unacked,
    # and the new supervisor's sweep publishes the outbox (seen at its start and 2 s later)
    assert wf.result(first, timeout=120) == {"join": sum(2 * i for i in range(1000))}
    assert wf.result(second, timeout=60) == {"join": sum(2 * i for i in range(10))}
    assert host.lines("join.txt") == ["join", "join"]
    assert _pending(store) == []


@pytest.mark.parametrize("host", [("wf_fanout", FANOUT)], indirect=True)
def test_on_rabbitmq_runs_started_by_a_process_that_exits_at_once_all_complete(host):
    """``wf.start`` returns once the run is in the store; the app's relay publishes its root
    step after (fastq.workflow.relay). A process that starts 40 runs and ends at once, without
    waiting for anything, has them all published at its exit (even with its relay slowed,
    holding most of them then): each completes, exactly."""
    wf = host.app.wf  # the supervisor is up (its start publishes what waits in the outbox)
    assert wf.result(wf.start(1), timeout=60) == {"join": 0}
    script = (  # each batch of the relay waits 0.3 s first
        "import time\n"
        "import fastq.workflow.relay as r\n"
        "publish = r.Relay._publish\n"
        "r.Relay._publish = lambda self, batch: (time.sleep(0.3), publish(self, batch))[1]\n"
        f"import {host.module} as m\n"
        "print(' '.join(m.wf.start(n) for n in range(1, 41)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=host.dir,
        env={
            **os.environ,
            "PYTHONPATH": f"{host.dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    run_ids = done.stdout.split()
    assert len(run_ids) == 40
    for n, run_id in enumerate(run_ids, start=1):
        assert wf.result(run_id, timeout=60) == {"join": sum(2 * i for i in range(n))}
    assert host.lines("join.txt") == ["join"] * 41
    assert sorted(map(int, host.lines("work.txt"))) == sorted(
        [0, *(i for n in range(1, 41) for i in range(n))]
    )
    assert _pending(host.app.app.result_store) == []
    assert "left in the outbox" not in host.logtext()  # the relay's doing, not the sweep's


@pytest.mark.parametrize("host", [("wf_fanout", FANOUT)], indirect=True)
def test_on_rabbitmq_a_running_supervisor_publishes_what_a_dead_starter_left_in_the_outbox(host):
    """A process killed between ``wf.start``'s transaction and its relay's publish leaves the
    run's root step in the store's outbox; the running supervisor's sweep publishes it (rows
    seen at two looks in a row, SWEEP_EVERY = 2 s apart), once."""
    import time

    from fastq.engine.outbox import SWEEP_EVERY
    from fastq.workflow import run

    wf, store = host.app.wf, host.app.app.result_store
    assert wf.result(wf.start(1), timeout=60) == {"join": 0}  # the supervisor is up
    made: list = []
    store.run_transaction(  # the starter's transaction, and no publish after it
        lambda tx: run.start(tx, "r-left", "fan", wf.graph(), msgspec.msgpack.encode([5]), 1.0),
        outbox=made,
    )
    assert _pending(store) == [i for i, _ in made]
    began = time.monotonic()
    assert wf.result("r-left", timeout=4 * SWEEP_EVERY + 30) == {"join": 20}
    assert time.monotonic() - began >= SWEEP_EVERY * 0.9  # not before a second look
    assert host.lines("join.txt") == ["join", "join"]
    assert sorted(map(int, host.lines("work.txt"))) == [0, 0, 1, 2, 3, 4]
    assert _pending(store) == []
    assert "publishing 1 workflow step message(s) left in the outbox" in host.logtext()


def _pending(store) -> list[int]:
    return [r[0] for r in store._db().execute("SELECT id FROM fastq_run_outbox ORDER BY id")]
