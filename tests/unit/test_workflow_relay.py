"""The outbox relay (``fastq.workflow.relay``): what ``wf.start`` hands over where the runs are
kept apart from the broker is published, and only then let go from the store's outbox; while
the broker refuses, it waits there. A real SQLite result store; the broker is a stand-in that
refuses on demand (tests/amqp/test_amqp_workflows.py runs it against RabbitMQ)."""

from __future__ import annotations

import logging
import threading
import time

import msgspec
import pytest

import fastq
from fastq.broker.sqlite import SqliteBroker
from fastq.errors import BrokerConnectionError
from fastq.testing import wait_until
from fastq.workflow import run
from fastq.workflow.relay import Relay


class Refusing:
    """A broker that refuses every publish while ``down`` is set, and keeps what it took."""

    url = "amqp://guest:***@127.0.0.1:5672/"

    def __init__(self) -> None:
        self.down = threading.Event()
        self.refused = 0
        self.taken: list[tuple[str, str]] = []

    def publish_sync(self, queue, messages) -> None:
        if self.down.is_set():
            self.refused += 1
            raise BrokerConnectionError("RabbitMQ at amqp://guest:***@127.0.0.1:5672/ refused")
        self.taken.extend((queue, m.message_id) for m in messages)


@pytest.fixture
def wf():
    app = fastq.App("relay", broker="memory://relay")
    flow = app.workflow("fan")

    @flow.step()
    async def source(n: int) -> list[int]:
        return list(range(n))

    return flow


def _start(store: SqliteBroker, wf, run_id: str) -> list:
    made: list = []
    store.run_transaction(
        lambda tx: run.start(
            tx, run_id, "fan", wf.graph(), msgspec.msgpack.encode([3]), time.time()
        ),
        outbox=made,
    )
    return made


def _outbox(store: SqliteBroker) -> list[str]:
    rows = store._db().execute("SELECT message_id FROM fastq_run_outbox ORDER BY id")
    return [r[0] for r in rows]


def test_what_is_handed_over_is_published_once_in_order_then_leaves_the_outbox(tmp_path, wf):
    store, broker = SqliteBroker(f"sqlite:///{tmp_path / 'runs.db'}"), Refusing()
    relay = Relay(broker, store)  # type: ignore[arg-type]
    handed = [_start(store, wf, f"r{i}") for i in range(50)]
    for made in handed:
        relay.submit(made)
    assert relay.flush(10)
    assert broker.taken == [(o.queue, o.message.message_id) for m in handed for _, o in m]
    assert len(broker.taken) == 50 and broker.refused == 0
    assert _outbox(store) == []


def test_while_the_broker_refuses_the_messages_wait_in_the_outbox_and_go_once_it_is_back(
    tmp_path, wf, caplog
):
    store, broker = SqliteBroker(f"sqlite:///{tmp_path / 'runs.db'}"), Refusing()
    relay = Relay(broker, store)  # type: ignore[arg-type]
    broker.down.set()
    made = _start(store, wf, "r1") + _start(store, wf, "r2")
    ids = [o.message.message_id for _, o in made]
    with caplog.at_level(logging.WARNING, logger="fastq.workflow.relay"):
        relay.submit(made)
        wait_until(lambda: broker.refused >= 3, 30)
        # refused three times: nothing taken, nothing let go
        assert broker.taken == [] and _outbox(store) == ids
        # a flush that cannot finish says where they wait, and returns
        assert relay.flush(0.2) is False
        broker.down.clear()
        assert relay.flush(30)
    assert [m for _, m in broker.taken] == ids  # each once, in order, after the refusals
    assert _outbox(store) == []
    text = caplog.text
    assert "publishing 2 workflow step message(s) to amqp://guest:***@127.0.0.1:5672/ " in text
    assert f"they wait in the outbox of {store.url}" in text
    assert "works again after" in text


def test_flush_all_waits_for_each_relay_even_after_one_that_cannot_finish(tmp_path, wf):
    """What a worker does before it leaves (``os._exit``: no atexit): every relay of the
    process publishes what it holds; one whose broker refuses does not keep the others'."""
    from fastq.workflow.relay import flush_all, relay_of

    class FakeApp:
        def __init__(self, broker: Refusing) -> None:
            self.broker = broker

    store = SqliteBroker(f"sqlite:///{tmp_path / 'runs.db'}")
    apps = [FakeApp(Refusing()), FakeApp(Refusing())]
    apps[0].broker.down.set()
    made = [_start(store, wf, "r0"), _start(store, wf, "r1")]
    for app, m in zip(apps, made, strict=True):
        relay_of(app, store).submit(m)  # type: ignore[arg-type]
    assert flush_all(1.0) is False  # the first cannot publish
    assert apps[1].broker.taken == [(o.queue, o.message.message_id) for _, o in made[1]]
    assert _outbox(store) == [o.message.message_id for _, o in made[0]]
    apps[0].broker.down.clear()
    assert flush_all(30) is True
    assert _outbox(store) == []


def test_a_forked_child_neither_publishes_nor_waits_for_what_its_parent_handed_over(tmp_path, wf):
    """fork copies the relay's list but not its thread: the child's exit must not wait for it
    (nor publish the parent's messages), and the child gets a relay of its own."""
    import os

    from fastq.workflow.relay import relay_of

    class FakeApp:
        def __init__(self, broker: Refusing) -> None:
            self.broker = broker

    store, app = SqliteBroker(f"sqlite:///{tmp_path / 'runs.db'}"), FakeApp(Refusing())
    app.broker.down.set()  # the parent's relay holds what it was given
    parent = relay_of(app, store)  # type: ignore[arg-type]
    parent.submit(_start(store, wf, "r1"))
    wait_until(lambda: app.broker.refused >= 1, 30)
    pid = os.fork()
    if pid == 0:  # the child
        began = time.monotonic()
        ok = parent.flush(5) and relay_of(app, store) is not parent  # type: ignore[arg-type]
        os._exit(0 if ok and time.monotonic() - began < 1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert parent.pending and app.broker.taken == []  # still the parent's, still held
    app.broker.down.clear()
    assert parent.flush(30) and _outbox(store) == []
