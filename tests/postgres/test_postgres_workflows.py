"""Workflows through real processes on PostgreSQL: the SQLite tests' apps
(tests/integration/test_workflows.py) on a schema of each test's own: Cloacina's tutorial (exact
summary, partitions overlapping), a fan-out of 1,000 with a worker SIGKILLed twice (the join
once), a failing step resumed by `fastq runs`; and RabbitMQ with a PostgreSQL result store
(a fan-out of 1,000 with a worker SIGKILLed twice, the outbox empty at the end)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import pika
import pytest

import fastq
from tests.integration.test_workflows import CATALOG, FANOUT, FLAKY
from tests.integration.wfhost import Host, check_fan_in, check_tutorial, kill_a_worker_twice


@pytest.fixture
def host(tmp_path, request, pg_url):
    module, source, query = request.param
    source = source.replace('"sqlite:///{db}"', repr(pg_url)).replace(
        '"sqlite:///{db}?lease=5"', repr(pg_url + query)
    )
    h = Host(tmp_path, f"pg_{module}", source)
    h.start()
    yield h
    h.close()


@pytest.mark.parametrize("host", [("wf_catalog", CATALOG, "")], indirect=True)
def test_the_cloacina_tutorial_on_postgres(host):
    wf = host.app.wf
    run_id = wf.start(10_000)
    check_tutorial(host, run_id)


@pytest.mark.parametrize("host", [("wf_fanout", FANOUT, "&lease=5")], indirect=True)
def test_a_fan_out_of_1000_on_postgres_with_a_worker_sigkilled_twice(host):
    run_id = host.app.wf.start(1000)
    kill_a_worker_twice(host)
    check_fan_in(host, run_id)


@pytest.mark.parametrize("host", [("wf_flaky", FLAKY, "")], indirect=True)
def test_a_failing_step_on_postgres_is_resumed_by_the_command(host):
    wf = host.app.wf
    run_id = wf.start()
    with pytest.raises(fastq.WorkflowFailed) as failed:
        wf.result(run_id, timeout=60)
    assert list(failed.value.failed) == ["parse"]
    assert failed.value.skipped == ["load"]
    (host.dir / "fixed").touch()
    done = subprocess.run(
        [sys.executable, "-m", "fastq", "runs", f"{host.module}:app", "resume", run_id],
        cwd=host.dir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout) == (
        0,
        f"resumed run {run_id}: parse, load will run again\n",
    ), done.stderr
    assert wf.result(run_id, timeout=60) == {"cleanup": "None audited"}
    assert sorted(host.lines("runs.txt")) == sorted(
        ["fetch", "parse", "parse", "parse", "audit", "cleanup", "parse", "load"]
    )
    assert wf.forget(run_id) is True
    assert wf.runs() == []
    assert wf.forget(run_id) is False


@pytest.fixture
def amqp_host(tmp_path, pg_url, amqp_url):
    q = f"fq-wfpg-{uuid.uuid4().hex[:8]}"
    broker = f"{amqp_url!r}, result_store={pg_url!r}"
    h = Host(tmp_path, "pg_amqp_fanout", FANOUT.replace('"sqlite:///{db}?lease=5"', broker), q=q)
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


def test_on_rabbitmq_with_a_postgres_result_store_a_fan_out_fans_in_once(amqp_host):
    host = amqp_host
    # Given RabbitMQ for the messages and PostgreSQL for the runs: a fan-out of 1,000
    run_id = host.app.wf.start(1000)
    # When a worker is SIGKILLed twice
    kill_a_worker_twice(host)
    # Then the sum is exact, the join ran once, every element done, the outbox empty
    assert host.app.wf.result(run_id, timeout=120) == {"join": sum(2 * i for i in range(1000))}
    assert host.lines("join.txt") == ["join"]
    elements = host.app.wf.status(run_id).steps["work"].elements
    assert [(e.index, e.state) for e in elements] == [(i, "done") for i in range(1000)]

    async def pending() -> list:
        store = fastq.App("peek", broker=host.app.app.result_store_url).broker
        await store.open()
        try:
            return await store.pending_outbox()
        finally:
            await store.close()

    assert asyncio.run(pending()) == []


def test_expire_deletes_ended_runs_older_than_the_cut_on_postgres(pg_url):
    """The SQLite test's check (tests/unit/test_workflow_run.py) in the broker's schema, and a
    start that expires them through the API."""
    app = fastq.App("pgexpire", broker=pg_url)
    try:
        _expire_through_the_api(app)
    finally:
        app.broker.bridge().close()


def _expire_through_the_api(app: fastq.App) -> None:
    from fastq.testing import wait_until
    from tests.unit.test_workflow_run import _ended, check_expiry

    app.broker.run_transaction(check_expiry)
    wf = app.workflow("w", keep=0.01)

    @wf.step()
    def only(n: int) -> int:
        return n

    def ended(state: str) -> list[str]:
        rows = app.broker.run_transaction(lambda tx: tx.runs("w", state, 10), write=False)
        return sorted(r.run_id for r in rows)

    assert ended("running") == ["w-running"]
    app.broker.run_transaction(lambda tx: _ended(tx, "w-again", "w", "done", 1.0))
    started = wf.start(1)
    wait_until(lambda: not wf.expiring.locked() and ended("done") == [], 10)
    assert ended("running") == sorted([started, "w-running"])
