"""The supervisor's side of a result store's workflow outbox (``fastq.engine.outbox``), on a real
SQLite result store: what a batch made ready stays in the outbox until published, then leaves
it, and the sweep publishes only rows that nobody has in hand, seen at two looks in a row."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest

import fastq
from fastq.broker.base import StoredResult
from fastq.broker.sqlite import SqliteBroker
from fastq.engine.outbox import StoreOutbox
from fastq.results import Outcome
from fastq.workflow import run
from fastq.workflow.state import StepRef


class Taking:
    """A broker that keeps what it is asked to publish."""

    url = "amqp://guest:***@127.0.0.1:5672/"

    def __init__(self) -> None:
        self.taken: list[str] = []

    async def publish_outputs(self, outputs) -> None:
        self.taken.extend(o.message.message_id for o in outputs)


@pytest.fixture
def wf():
    app = fastq.App("outbox", broker="memory://outbox")
    flow = app.workflow("chain")

    @flow.step()
    async def one(n: int) -> int:
        return n

    @flow.step(depends_on=[one])
    async def two(one: int) -> int:
        return one

    return flow


def _outbox(store: SqliteBroker) -> list[int]:
    return [r[0] for r in store._db().execute("SELECT id FROM fastq_run_outbox ORDER BY id")]


def _committed(store: SqliteBroker, wf, run_id: str) -> list:
    """A starter's transaction: the run, and its root's message in the outbox (its rows)."""
    made: list = []
    store.run_transaction(
        lambda tx: run.start(tx, run_id, "chain", wf.graph(), msgspec.msgpack.encode([1]), 1.0),
        outbox=made,
    )
    return made


def _start(store: SqliteBroker, wf, run_id: str) -> None:
    made = _committed(store, wf, run_id)
    store.outbox_done_sync([i for i, _ in made])  # as the starter's relay does


def _done(run_id: str) -> StoredResult:
    value = msgspec.msgpack.encode((msgspec.Raw(b"\x01"), {}, time.time()))
    outcome = msgspec.msgpack.encode(
        Outcome(ok=True, value=msgspec.Raw(value), finished_at=time.time())
    )
    return StoredResult(f"m-{run_id}", "", outcome, 60.0, step=StepRef(run_id, "one", -1, 1))


def test_what_a_batch_made_ready_waits_in_the_outbox_until_it_was_published(tmp_path, wf):
    store, broker = SqliteBroker(f"sqlite:///{tmp_path / 'runs.db'}"), Taking()
    for r in ("r1", "r2"):
        _start(store, wf, r)

    async def main() -> None:
        await store.open()
        out = StoreOutbox(broker, store)  # type: ignore[arg-type]
        made = await out.record([_done("r1"), _done("r2")])  # step one of each made two ready
        assert [o.queue for o in made] == ["default", "default"]
        assert _outbox(store) == sorted(out.in_hand.values()) and len(_outbox(store)) == 2
        await out.published(made[:1])  # the first confirmed: it alone leaves
        assert _outbox(store) == [out.in_hand[made[1].message.message_id]]
        await out.published(made[1:])
        assert _outbox(store) == [] and out.in_hand == {}
        await store.close()

    asyncio.run(main())


def test_the_sweep_publishes_rows_seen_twice_and_never_those_in_hand(tmp_path, wf):
    store, broker = SqliteBroker(f"sqlite:///{tmp_path / 'runs.db'}"), Taking()
    _start(store, wf, "r1")
    left = _committed(store, wf, "r2")  # its starter was killed: nobody publishes r2's root

    async def main() -> None:
        await store.open()
        out = StoreOutbox(broker, store)  # type: ignore[arg-type]
        made = await out.record([_done("r1")])  # in hand: recorded, not yet published
        assert await out.sweep() == 0  # the first look only notes what is there
        assert await out.sweep() == 1  # seen twice and nobody's: r2's root
        assert broker.taken == [left[0][1].message.message_id]
        assert _outbox(store) == [out.in_hand[made[0].message.message_id]]
        assert await out.sweep() == 0  # still in hand at a second look: not the sweep's
        assert broker.taken == [left[0][1].message.message_id]
        await out.published(made)
        assert _outbox(store) == [] and await out.sweep() == 0
        await store.close()

    asyncio.run(main())


def test_a_starting_supervisor_does_not_publish_what_a_live_relay_lets_go_meanwhile(tmp_path, wf):
    """A supervisor that starts while a producer's relay holds rows (published, or about to
    be): its first look only notes them; gone by its second, they are never published again."""
    store, broker = SqliteBroker(f"sqlite:///{tmp_path / 'runs.db'}"), Taking()
    held = _committed(store, wf, "r1")

    async def main() -> None:
        await store.open()
        out = StoreOutbox(broker, store)  # type: ignore[arg-type]
        assert await out.sweep() == 0  # the start's look
        await store.outbox_done([i for i, _ in held])  # the relay published and let go
        assert await out.sweep() == 0 and broker.taken == []
        await store.close()

    asyncio.run(main())
