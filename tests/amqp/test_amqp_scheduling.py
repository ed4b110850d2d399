"""Scheduling on RabbitMQ with `fastq worker` processes: delayed sends through the TTL queues
(never early, within a second), a periodic task under three supervisors with one leader (one run
per tick), the leader SIGKILLed (the next ticks still run once each), and unique sends from ten
processes through the App's result store (one message)."""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import time
import uuid

import pika
import psutil
import pytest
from schedhosts import Hosts, assert_one_run_per_tick

from fastq.testing import wait_until

#: how late a delayed message may run (a second, as issue 17 asks)
LATE = 1.0


@pytest.fixture
def hosts(tmp_path, amqp_url):
    q = f"fq-sched-{uuid.uuid4().hex[:8]}"
    h = Hosts(tmp_path, amqp_url, q=q, store=f"sqlite:///{tmp_path}/results.db")
    yield h
    h.close()
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        for name in (f"{q}.ticks", f"{q}.later", f"{q}.once"):
            channel.queue_delete(name)
            channel.queue_delete(name + ".dlq")
        channel.queue_delete(f"fastq.schedule.sched-{q}")
        channel.queue_delete(f"fastq.schedule.sched-{q}.last")
        out = subprocess.run(
            ["rabbitmqctl", "list_queues", "name", "--quiet"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        for name in out.split():
            if name.startswith(q) and ".retry." in name:
                channel.queue_delete(name)
    finally:
        connection.close()


def ready(url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def test_delayed_sends_wait_in_ttl_queues_and_run_at_their_time(hosts):
    later = hosts.app.later
    hosts.start()
    later.send(0.0)  # Given a supervisor that runs (its first message ran)
    hosts.wait_for_lines("later", 1)
    # When one is sent with delay= and one with eta=
    start = time.time()
    later.send(start + 1.5, delay=1.5)
    eta = dt.datetime.fromtimestamp(start + 2.25, dt.timezone(dt.timedelta(hours=9)))
    later.send(eta.timestamp(), eta=eta)
    hosts.wait_for_lines("later", 3)
    assert hosts.stop(0) == 0
    # Then neither ran early, and each within a second of its time
    runs = [(float(due), float(ran)) for due, ran in hosts.lines("later")[1:]]
    assert len(runs) == 2
    for due, ran in runs:
        assert due <= ran < due + LATE


def _leader(hosts: Hosts) -> int:
    leaders = [i for i in range(len(hosts.procs)) if "this supervisor leads" in hosts.log(i)]
    assert len(leaders) >= 1
    alive = [i for i in leaders if hosts.procs[i].poll() is None]
    return alive[-1]


def test_one_run_per_tick_under_three_supervisors_and_after_the_leader_is_killed(hosts):
    # Given three supervisors on one RabbitMQ, each running the scheduler
    for _ in range(3):
        hosts.start()
    for i in range(3):
        hosts.wait_for_log(i, "scheduler: started")
    hosts.wait_for_lines("tick", 1)
    first = hosts.ticks()[0]
    # When a periodic task (every second) runs for ten seconds
    wait_until(lambda: max(hosts.ticks()) >= first + 9, 60, lambda: str(hosts.ticks()))
    # and then the leader is SIGKILLed, half-way between two ticks (so that no tick's run is
    # unacked there: that one would run again, as any message of a killed host)
    leader = _leader(hosts)
    wait_until(lambda: 0.4 < time.time() % 1 < 0.6, 5)
    workers = psutil.Process(hosts.procs[leader].pid).children(recursive=True)
    killed_at = time.time()
    hosts.procs[leader].send_signal(signal.SIGKILL)
    hosts.procs[leader].wait(30)
    for w in workers:
        w.kill()
    # Then the ticks go on, enqueued by a new leader
    wait_until(lambda: max(hosts.ticks()) >= killed_at + 4, 60, lambda: str(hosts.ticks()))
    others = [i for i in range(3) if i != leader]
    wait_until(lambda: _leader(hosts) in others, 10)
    assert [hosts.stop(i) for i in others] == [0, 0]
    # and every tick ran exactly once, none missing, before and after the kill
    ticks = hosts.ticks()
    assert len([t for t in ticks if t > killed_at]) >= 4
    assert len(ticks) >= 14
    assert_one_run_per_tick(ticks)


def test_unique_sends_from_ten_processes_through_the_result_store(hosts, amqp_url):
    hosts.start()  # declares the queues; its workers take nothing: no message yet
    hosts.wait_for_log(0, "scheduler: started")
    assert hosts.stop(0) == 0
    # Given no supervisor, when ten processes send the same unique call at once
    ids = hosts.unique_sends(10)
    # Then all ten got the id of the one message enqueued
    assert len(set(ids)) == 1
    assert ready(amqp_url, f"{hosts.app.app.tasks['once'].queue}") == 1
    # When it ran (acked: the supervisor frees its key in the store), a later send enqueues again
    hosts.start()
    hosts.wait_for_lines("once", 1)
    wait_until(lambda: hosts.app.once.send(1) != ids[0], 10)
    hosts.wait_for_lines("once", 2)
    assert hosts.stop(1) == 0
    assert hosts.lines("once") == [["1"], ["1"]]
