"""Unique sends and periodic ticks on memory:// and sqlite:// in one process: a key held while
its message is queued or running, freed by the ack or the dead letter (not by a retry), capped
by unique_for; a tick enqueued once and never one older than the latest; and an older SQLite
file brought up to the schema."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

import fastq
from fastq.broker import open_broker
from fastq.broker.base import Message, Retry
from fastq.schedule import Schedule, tick_of


@pytest.fixture(params=["memory", "sqlite"])
def app(request, tmp_path):
    url = (
        f"memory://unique-{time.monotonic_ns()}"
        if request.param == "memory"
        else f"sqlite:///{tmp_path}/q.db"
    )
    return fastq.App("unique-test", broker=url)


def test_unique_send_returns_the_holder_until_acked(app):
    @app.task(name="u", unique=True)
    def u(n: int) -> None: ...

    async def go() -> None:
        broker = app.broker
        await broker.open()
        # Given a unique send, when the same arguments are sent again, then the first id comes
        # back and nothing is enqueued; other arguments are another key
        first = u.send(1)
        assert u.send(1) == first
        other = u.send(2)
        assert other != first
        assert (await broker.queue_depth("default")).ready == 2
        # When the first is retried, its key holds; once it is acked, the key is free
        [d1, d2] = await broker.fetch("default", 10, timeout=1)
        await broker.settle("default", retry=[Retry(d1.tag, 0.0, "again")])
        assert u.send(1) == first
        [d1] = await broker.fetch("default", 10, timeout=1)
        await broker.settle("default", ack=[d1.tag], dead=[(d2.tag, "bad")])
        again = u.send(1)
        assert again != first
        assert u.send(2) != other  # freed by the dead letter
        assert u.send(3, unique_key="mine") == u.send(4, unique_key="mine")
        assert (await broker.queue_depth("default")).ready == 3
        await broker.close()

    asyncio.run(go())


def test_unique_for_caps_the_key(app):
    @app.task(name="u", unique_for=0.2)
    def u(n: int) -> None: ...

    first = u.send(1, unique_key="k")
    assert u.send(1, unique_key="k") == first
    time.sleep(0.25)  # the cap is wall-clock time: it has to pass (not a synchronisation)
    assert u.send(1, unique_key="k") != first


def test_a_tick_is_enqueued_once_and_never_an_older_one(app):
    @app.task(name="p")
    def p() -> None: ...

    sched = Schedule("p", every=1.0)

    async def go() -> None:
        broker = app.broker
        await broker.open()
        assert await broker.last_tick("p") is None
        assert await broker.publish_tick("p", 10.0, "default", p.tick_message(sched, 10.0))
        assert not await broker.publish_tick("p", 10.0, "default", p.tick_message(sched, 10.0))
        assert not await broker.publish_tick("p", 9.0, "default", p.tick_message(sched, 9.0))
        assert await broker.publish_tick("p", 11.0, "default", p.tick_message(sched, 11.0))
        assert await broker.last_tick("p") == 11.0
        got = await broker.fetch("default", 10, timeout=1)
        assert [tick_of(d.message_id) for d in got] == [10.0, 11.0]
        assert got[0].headers == {"fastq-tick": "10.0"}
        await broker.close()

    asyncio.run(go())


def test_keys_in_a_result_store(tmp_path):
    for url in (f"sqlite:///{tmp_path}/r.db", f"memory://store-{time.monotonic_ns()}"):
        store = open_broker(url)
        assert store.claim_unique("k", "a", None) == "a"
        assert store.claim_unique("k", "b", None) == "a"
        store.free_unique_sync([("k", "b")])  # not its holder: nothing happens
        assert store.claim_unique("k", "b", None) == "a"
        store.free_unique_sync([("k", "a")])
        assert store.claim_unique("k", "b", 0.01) == "b"
        time.sleep(0.02)  # the cap is wall-clock time
        assert store.claim_unique("k", "c", None) == "c"


def test_an_older_sqlite_file_gets_the_unique_columns(tmp_path):
    # Given a file made by the previous schema, with a message in it
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        """CREATE TABLE fastq_messages (
            id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, message_id TEXT NOT NULL,
            body BLOB NOT NULL, headers BLOB, attempts INTEGER NOT NULL DEFAULT 0,
            retries INTEGER NOT NULL DEFAULT 0, visible_at REAL NOT NULL, lease_owner TEXT,
            last_error TEXT);
        INSERT INTO fastq_messages (queue, message_id, body, visible_at)
            VALUES ('q', 'old', x'00', 0);
        """
    )
    db.close()
    # When this broker opens it and sends unique messages, then it works and the old row stays
    broker = open_broker(f"sqlite:///{path}")
    m = Message(b"x", "new", unique_key="k")
    assert broker.publish_unique_sync("q", m) == "new"
    assert broker.publish_unique_sync("q", Message(b"x", "newer", unique_key="k")) == "new"
    rows = sqlite3.connect(path).execute("SELECT message_id FROM fastq_messages").fetchall()
    assert rows == [("old",), ("new",)]
