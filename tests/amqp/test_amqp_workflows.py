"""Workflows on the real RabbitMQ, their runs in a SQLite result store: the supervisor records a
step's outcome there (the messages it made ready kept in the store's outbox), publishes them with
confirm, then acks. The SQLite tests' apps (tests/integration/test_workflows.py) on queues of
each test's own: Cloacina's tutorial (exact, partitions overlapping), a fan-out of 1,000 with a
worker SIGKILLed twice (the join once), a failing step resumed."""

from __future__ import annotations

import signal
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
    # and the new supervisor publishes the outbox at its start
    assert wf.result(first, timeout=120) == {"join": sum(2 * i for i in range(1000))}
    assert wf.result(second, timeout=60) == {"join": sum(2 * i for i in range(10))}
    assert host.lines("join.txt") == ["join", "join"]
    assert _pending(store) == []


def _pending(store) -> list[int]:
    return [r[0] for r in store._db().execute("SELECT id FROM fastq_run_outbox ORDER BY id")]
