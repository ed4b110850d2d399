"""The run state machine (fastq.workflow.run) on MemoryRuns, no processes: what each outcome
records and enqueues, counted exactly; and whole runs through memory:// with drain."""

from __future__ import annotations

import itertools
import time

import msgspec
import pytest

import fastq
from fastq import message, results
from fastq.testing import AMQP_URL, drain
from fastq.workflow import run
from fastq.workflow.state import MemoryRuns, RunRow, StepRef, StepRow, drive

_enc = msgspec.msgpack.Encoder()


def complete(tx, ref, outcome, now):
    return drive(run.complete(tx, ref, outcome, now))


def resume(tx, run_id, now):
    return drive(run.resume(tx, run_id, now))


def step(tx, *key):
    return drive(tx.step(*key))


def ok(value, changes=None) -> bytes:
    return results.success(_enc.encode((value, changes or {}, time.time())))


def failed(reason: str) -> bytes:
    return results.failure("ValueError", "bad", "", reason)


@pytest.fixture
def wf():
    app = fastq.App("runs", broker="memory://unit-runs")
    w = app.workflow("fan")

    @w.step()
    def source(n: int) -> list[int]:
        return list(range(n))

    @w.step(depends_on=[source], fan_out=True)
    def square(source: int) -> int:
        return source * source

    @w.step(depends_on=[square])
    def total(square: list[int]) -> int:
        return sum(square)

    @w.step(depends_on=[source])
    def side(source: list[int]) -> int:
        return len(source)

    @w.step(depends_on=[total, side], trigger="all_done")
    def cleanup(total: int | None, side: int | None) -> str:
        return "clean"

    return w


class Queue:
    """What the state machine enqueued: (queue, step/index, args)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, list[object]]] = []

    def __call__(self, queue: str, message_id: str, body: bytes, headers: dict[str, str]) -> None:
        env = message.decode(body)
        args = msgspec.msgpack.decode(env.args)
        self.sent.append((queue, headers["fastq-run"].split("/", 1)[1], args[1:]))

    def steps(self) -> list[str]:
        return [s for _, s, _ in self.sent]


def started(wf, n=3):
    q = Queue()
    tx = MemoryRuns(q)
    drive(run.start(tx, "r1", "fan", wf.graph(), _enc.encode([n]), 1.0))
    return tx, q


def test_start_enqueues_the_roots_with_the_start_arguments(wf):
    tx, q = started(wf)
    assert q.sent == [("default", "source/-1", [3])]
    assert tx.counters[("r1", "open")] == 5
    assert tx.counters[("r1", "wait:cleanup")] == 2
    # only the join of two parents waits on a counter; a step is written when it is enqueued
    assert sorted(name for rid, name in tx.counters if rid == "r1") == ["open", "wait:cleanup"]
    assert [(r.step, r.state) for r in drive(tx.steps("r1"))] == [("source", "running")]
    assert step(tx, "r1", "total", -1) is None


def test_forgetting_a_run_drops_its_rows_and_counters_and_keeps_the_others(wf):
    tx, _ = started(wf)
    drive(run.start(tx, "r2", "fan", wf.graph(), _enc.encode([2]), 1.0))
    assert complete(tx, StepRef("r1", "source", -1), ok([0, 1, 2]), 2.0)
    assert complete(tx, StepRef("r1", "side", -1), failed("no"), 3.0)
    for i in range(3):
        assert complete(tx, StepRef("r1", "square", i), failed("no"), 3.0)
    assert complete(tx, StepRef("r1", "cleanup", -1), ok("clean"), 4.0)
    assert drive(tx.run("r1")).state == "failed"
    assert drive(run.forget(tx, "r1"))
    assert drive(tx.run("r1")) is None and drive(tx.steps("r1")) == []
    assert [k for k in tx.counters if k[0] == "r1"] == []
    assert sorted(name for rid, name in tx.counters if rid == "r2") == ["open", "wait:cleanup"]
    assert [(r.step, r.state) for r in drive(tx.steps("r2"))] == [("source", "running")]


def test_fan_out_enqueues_each_element_and_the_join_exactly_once_whatever_the_order(wf):
    tx, q = started(wf)
    assert complete(tx, StepRef("r1", "source", -1), ok([0, 1, 2]), 2.0)
    assert q.steps()[1:] == ["square/0", "square/1", "square/2", "side/-1"]
    assert [args for _, s, args in q.sent if s.startswith("square")] == [[0], [1], [2]]
    # elements end out of order; one of them twice (a redelivery): the first completion wins
    assert complete(tx, StepRef("r1", "square", 2), ok(4), 3.0)
    assert complete(tx, StepRef("r1", "square", 0), ok(0), 3.0)
    assert not complete(tx, StepRef("r1", "square", 0), ok(99), 3.0)
    assert "total/-1" not in q.steps()
    assert complete(tx, StepRef("r1", "square", 1), ok(1), 3.0)
    assert q.steps().count("total/-1") == 1
    assert q.sent[-1][2] == [[0, 1, 4]]  # in element order
    assert not complete(tx, StepRef("r1", "square", 1), ok(1), 3.0)
    assert q.steps().count("total/-1") == 1
    complete(tx, StepRef("r1", "total", -1), ok(5), 4.0)
    assert "cleanup/-1" not in q.steps()  # side still open
    complete(tx, StepRef("r1", "side", -1), ok(3), 4.0)
    assert q.sent[-1][1:] == ("cleanup/-1", [5, 3])
    complete(tx, StepRef("r1", "cleanup", -1), ok("clean"), 5.0)
    assert drive(tx.run("r1")).state == "done"
    assert len(q.sent) == 7  # source, 3 elements, side, total, cleanup: each once


def test_a_failed_element_fails_its_step_skips_dependents_and_all_done_still_runs(wf):
    tx, q = started(wf, 2)
    complete(tx, StepRef("r1", "source", -1), ok([0, 1]), 2.0)
    complete(tx, StepRef("r1", "square", 0), ok(0), 3.0)
    complete(tx, StepRef("r1", "square", 1, attempts=4), failed("ValueError: bad (after 4)"), 3.0)
    row = step(tx, "r1", "square", -1)
    assert (row.state, row.attempts) == ("failed", 4)
    assert row.error == "1 of 2 elements failed; element 1: ValueError: bad (after 4)"
    assert step(tx, "r1", "total", -1).state == "skipped"
    assert step(tx, "r1", "total", -1).error == "skipped: square failed"
    complete(tx, StepRef("r1", "side", -1), ok(2), 4.0)
    assert q.sent[-1][1:] == ("cleanup/-1", [None, 2])  # None for the parent that did not end done
    complete(tx, StepRef("r1", "cleanup", -1), ok("clean"), 5.0)
    assert drive(tx.run("r1")).state == "failed"
    # resume: only the failed element and what it skipped run again
    sent = len(q.sent)
    assert resume(tx, "r1", 6.0) == ["square", "total"]
    assert q.steps()[sent:] == ["square/1"]
    complete(tx, StepRef("r1", "square", 1), ok(1), 7.0)
    assert q.steps()[sent:] == ["square/1", "total/-1"]
    assert q.sent[-1][2] == [[0, 1]]
    complete(tx, StepRef("r1", "total", -1), ok(1), 8.0)
    assert drive(tx.run("r1")).state == "done"
    assert resume(tx, "r1", 9.0) == []


def test_an_empty_fan_out_joins_at_once_with_an_empty_list(wf):
    tx, q = started(wf, 0)
    complete(tx, StepRef("r1", "source", -1), ok([]), 2.0)
    assert q.steps()[1:] == ["total/-1", "side/-1"]
    assert q.sent[1][2] == [[]]


def test_a_whole_run_through_memory_with_drain_keeps_context_and_result():
    app = fastq.App("drained", broker="memory://unit-drained")
    wf = app.workflow("ctx")

    @wf.step()
    def first(ctx: fastq.RunContext) -> int:
        ctx.set("seen", [ctx.run_id])
        return 1

    @wf.step(depends_on=[first], retry_attempts=1, retry_delay=0.0)
    def second(first: int, ctx: fastq.RunContext) -> str:
        return f"{first} {ctx.get('seen') == [ctx.run_id]} {ctx.get('missing', 'dflt')}"

    run_id = wf.start()
    assert drain(app) == fastq.testing.Drained(ok=2, retried=0, dead=0)
    assert wf.result(run_id, timeout=1) == {"second": "1 True dflt"}
    assert wf.status(run_id).context == {"seen": [run_id]}
    with pytest.raises(
        fastq.ConfigError,
        match=r"^no run 'nope' in memory://unit-drained; list the runs with "
        r"`fastq runs module:app`$",
    ):
        wf.status("nope")


async def _ended(tx, run_id, workflow, state, finished_at):
    await tx.put_run(RunRow(run_id, workflow, b"", b"", state, 1.0, finished_at))
    await tx.put_step(StepRow(run_id, "only", -1, "done", finished_at=finished_at))
    await tx.set(run_id, "open", 0)
    await tx.set_context(run_id, {"k": b"\x01"})


async def check_expiry(tx, workflow="w"):
    """``run.expire`` on any RunTx (a coroutine: PostgreSQL's awaits): ended runs of the
    workflow older than the cut go, the oldest first, with all they hold; running ones and
    other workflows' stay."""
    other = workflow + "-other"
    await _ended(tx, f"{workflow}-old", workflow, "done", 100.0)
    await _ended(tx, f"{workflow}-older-failed", workflow, "failed", 50.0)
    await _ended(tx, f"{workflow}-recent", workflow, "done", 300.0)
    await _ended(tx, f"{workflow}-running", workflow, "running", 0.0)
    await _ended(tx, f"{other}-done", other, "done", 10.0)
    assert await run.expire(tx, workflow, 200.0, 1) == 1
    assert await tx.run(f"{workflow}-older-failed") is None
    assert await tx.run(f"{workflow}-old") is not None
    assert await run.expire(tx, workflow, 200.0, 10) == 1
    assert await tx.run(f"{workflow}-old") is None and await tx.steps(f"{workflow}-old") == []
    assert await tx.context(f"{workflow}-old") == {}
    assert await run.expire(tx, workflow, 1e12, 10) == 1  # "recent"; never the running one
    assert [r.run_id for r in await tx.runs(workflow, None, 10)] == [f"{workflow}-running"]
    assert [r.run_id for r in await tx.runs(other, None, 10)] == [f"{other}-done"]
    assert await tx.steps(f"{workflow}-running") != []
    assert await tx.context(f"{other}-done") == {"k": b"\x01"}


def test_expire_deletes_ended_runs_older_than_the_cut_in_memory():
    tx = MemoryRuns(Queue())
    drive(check_expiry(tx))
    assert ("w-old", "open") not in tx.counters and ("w-running", "open") in tx.counters


def test_expire_deletes_ended_runs_older_than_the_cut_in_sqlite(tmp_path):
    from fastq.broker import sqlite_runs
    from fastq.broker.sqlite import SqliteBroker

    broker = SqliteBroker(f"sqlite:///{tmp_path / 'q.db'}")
    db = broker._db()
    db.execute("BEGIN IMMEDIATE")
    drive(check_expiry(sqlite_runs.SqliteRuns(db, lambda *a: None)))
    counters = db.execute("SELECT run_id FROM fastq_run_counters ORDER BY run_id").fetchall()
    db.execute("COMMIT")
    assert counters == [("w-other-done",), ("w-running",)]


def test_a_start_has_every_run_that_ended_longer_ago_than_keep_deleted(monkeypatch, caplog):
    import logging

    from fastq.testing import wait_until
    from fastq.workflow import api

    monkeypatch.setattr(api, "EXPIRE_BATCH", 2)  # five old runs: three batches, one thread
    app = fastq.App("keeping", broker="memory://unit-keeping")
    short, kept = app.workflow("short", keep=60.0), app.workflow("kept", keep=None)

    @short.step()
    def one(n: int) -> int:
        return n

    @kept.step()
    def two(n: int) -> int:
        return n

    now = time.time()

    async def given(tx) -> None:
        for i in range(5):
            await _ended(tx, f"old-{i}", "short", "done", now - 120.0)
            await _ended(tx, f"kept-{i}", "kept", "done", now - 120.0)
        await _ended(tx, "recent", "short", "failed", now - 1.0)

    def runs(workflow: str) -> list[str]:
        rows = app.broker.run_transaction(lambda tx: tx.runs(workflow, None, 100), write=False)
        return sorted(r.run_id for r in rows)

    # Given five runs of each workflow that ended two minutes ago, and one that ended just now
    app.broker.run_transaction(given)
    # When each starts a run
    with caplog.at_level(logging.INFO, logger="fastq.workflow.api"):
        started = short.start(1)
        forever = kept.start(2)
        wait_until(lambda: not short.expiring.locked() and len(runs("short")) == 2, 10, caplog.text)
    # Then the runs that ended over keep ago are gone, every one though more than a batch, said
    # so in the log; the recent one and the new one stay; so does every run of the workflow that
    # keeps them until forgotten
    assert runs("short") == sorted(["recent", started])
    assert runs("kept") == sorted([*(f"kept-{i}" for i in range(5)), forever])
    assert "workflow short: deleted 5 runs that ended over 60 s ago" in caplog.text
    assert drain(app).ok == 2
    assert short.result(started, timeout=1) == {"one": 1}


def test_a_handler_starts_a_run_and_a_step_reads_typed_context():
    import msgspec as ms

    class Point(ms.Struct):
        x: int

    app = fastq.App("kicked", broker="memory://unit-kicked")
    wf = app.workflow("kick")
    started: list[str] = []

    @wf.step()
    def mark(ctx: fastq.RunContext) -> int:
        ctx.set("point", Point(3))
        return 1

    @wf.step(depends_on=[mark])
    def read(mark: int, ctx: fastq.RunContext) -> int:
        return mark + ctx.get("point", type=Point).x

    @app.task()
    def kick() -> None:
        started.append(wf.start())

    kick.send()
    assert drain(app) == fastq.testing.Drained(ok=3, retried=0, dead=0)
    assert wf.result(started[0], timeout=1) == {"read": 4}


def test_outcomes_of_another_version_change_nothing_or_fail_the_step_never_raise(wf):
    tx, _ = started(wf)
    # a step this run was not started with: ignored
    assert not complete(tx, StepRef("r1", "renamed", -1), ok(1), 2.0)
    # a fan-out over a value that is not a list (a parent of another version): the step fails
    complete(tx, StepRef("r1", "source", -1), ok({"not": "a list"}), 2.0)
    row = step(tx, "r1", "square", -1)
    assert row.state == "failed" and row.error.startswith("cannot fan out: ")
    assert step(tx, "r1", "total", -1).state == "skipped"


def test_sqlite_records_each_step_under_a_savepoint_and_logs_what_breaks(tmp_path, caplog):
    from fastq.broker import sqlite_runs
    from fastq.broker.sqlite import SqliteBroker

    broker = SqliteBroker(f"sqlite:///{tmp_path / 'q.db'}")
    db = broker._db()
    db.execute("BEGIN IMMEDIATE")
    tx = sqlite_runs.SqliteRuns(db, lambda *a: None)
    drive(tx.put_run(RunRow("r1", "fan", b"\xc1", b"\x90", "running", 1.0)))  # bad graph
    drive(tx.put_step(StepRow("r1", "source", -1, "running")))
    sqlite_runs.record(db, tx, [(StepRef("r1", "source", -1), ok([1]))], 2.0)
    db.execute("COMMIT")
    assert "recording step source (element -1) of run r1 failed" in caplog.text
    assert drive(tx.step("r1", "source", -1)).state == "running"  # rolled back to the savepoint


def test_sqlite_records_a_batch_once_when_one_step_in_it_breaks(wf, tmp_path, caplog):
    """The batch goes under one savepoint; one bad step rolls it back and the batch is recorded
    again one by one: the good steps' rows, counters and enqueued children exactly once."""
    from fastq.broker import sqlite_runs
    from fastq.broker.sqlite import SqliteBroker

    broker = SqliteBroker(f"sqlite:///{tmp_path / 'q.db'}")
    db = broker._db()
    db.execute("BEGIN IMMEDIATE")
    tx = broker._runs(db, 1.0)
    drive(run.start(tx, "r2", "fan", wf.graph(), _enc.encode([3]), 1.0))
    drive(tx.put_run(RunRow("r1", "fan", b"\xc1", b"\x90", "running", 1.0)))  # bad graph
    drive(tx.put_step(StepRow("r1", "source", -1, "running")))
    batch = [
        (StepRef("r2", "source", -1), ok([0, 1, 2])),
        (StepRef("r1", "source", -1), ok([1])),
        (StepRef("r2", "side", -1), ok(3)),
    ]
    sqlite_runs.record(db, tx, batch, 2.0)
    db.execute("COMMIT")
    assert caplog.text.count("recording step source (element -1) of run r1 failed") == 1
    assert drive(tx.step("r1", "source", -1)).state == "running"
    assert [drive(tx.step("r2", s, -1)).state for s in ("source", "side")] == ["done", "done"]
    assert drive(tx.add("r2", "open", 0)) == 3
    assert drive(tx.add("r2", "left:square", 0)) == 3
    # the roots' message, then three elements and side, each once (the first try rolled back)
    assert db.execute("SELECT count(*) FROM fastq_messages").fetchone()[0] == 5


def test_as_a_result_store_a_batch_with_a_bad_step_hands_out_each_made_message_once(
    wf, tmp_path, caplog
):
    """As RabbitMQ's result store the steps made ready go to the outbox and back to the caller,
    which publishes them: after a rollback to the batch's savepoint SQLite reuses the outbox
    ids, so the caller's list must lose what the rolled-back try made."""
    import asyncio

    from fastq.broker.base import StoredResult
    from fastq.broker.sqlite import SqliteBroker

    broker = SqliteBroker(f"sqlite:///{tmp_path / 'r.db'}")
    started: list = []
    broker.run_transaction(
        lambda tx: run.start(tx, "r2", "fan", wf.graph(), _enc.encode([3]), 1.0), outbox=started
    )

    async def bad(tx) -> None:  # a run whose graph does not decode: recording it raises
        await tx.put_run(RunRow("r1", "fan", b"\xc1", b"\x90", "running", 1.0))
        await tx.put_step(StepRow("r1", "source", -1, "running"))

    broker.run_transaction(bad)
    broker.outbox_done_sync([i for i, _ in started])

    def stored(step: StepRef, outcome: bytes) -> StoredResult:
        return StoredResult(f"m-{step.step}", "", outcome, 1.0, step=step)

    async def recorded() -> list:
        await broker.open()
        try:
            return await broker.record_steps(
                [
                    stored(StepRef("r2", "source", -1), ok([0, 1, 2])),
                    stored(StepRef("r1", "source", -1), ok([1])),
                ]
            )
        finally:
            await broker.close()

    made = asyncio.run(recorded())
    assert "recording step source (element -1) of run r1 failed" in caplog.text
    steps = [o.message.headers["fastq-run"] for _, o in made]
    assert steps == ["r2/square/0", "r2/square/1", "r2/square/2", "r2/side/-1"]
    outbox = broker._db().execute("SELECT id, message_id FROM fastq_run_outbox ORDER BY id")
    assert [(i, o.message.message_id) for i, o in made] == outbox.fetchall()


def test_start_arguments_are_checked_against_the_roots_and_their_defaults_apply():
    app = fastq.App("defaults", broker="memory://unit-defaults")
    wf = app.workflow("d")

    @wf.step()
    def gen(n: int, scale: int = 10) -> int:
        return n * scale

    run_id = wf.start(4)
    drain(app)
    assert wf.result(run_id, timeout=1) == {"gen": 40}
    with pytest.raises(msgspec.ValidationError, match=r"Expected `int`, got `str`"):
        wf.start("four")
    with pytest.raises(TypeError, match=r"missing a required argument: 'n'"):
        wf.start()


def test_a_run_header_that_is_not_ours_makes_an_ordinary_message():
    from fastq.workflow.state import ref_of

    assert ref_of({"fastq-run": "r/s/2"}, 3) == StepRef("r", "s", 2, 3)
    assert ref_of({"fastq-run": "garbage"}, 1) is None
    assert ref_of({"fastq-run": "a/b/c"}, 1) is None
    assert ref_of(None, 1) is None


def test_result_async_waits_off_the_loop_and_times_out_saying_what_did_not_end():
    import asyncio

    app = fastq.App("asyncres", broker="memory://unit-asyncres")
    wf = app.workflow("a")

    @wf.step()
    async def one() -> int:
        return 1

    @wf.step(depends_on=[one])
    async def two(one: int) -> int:
        return one + 1

    run_id = wf.start()
    with pytest.raises(
        TimeoutError,
        match=rf"^run {run_id} of workflow a did not end within 0.1 s; not ended: one, two; "
        r"wait longer, or check that a worker consumes the steps' queues$",
    ):
        asyncio.run(wf.result_async(run_id, timeout=0.1))
    drain(app)
    assert asyncio.run(wf.result_async(run_id, timeout=5)) == {"two": 2}


def test_on_rabbitmq_a_step_queue_gets_the_confirm_allowance_an_ordinary_queue_does_not(tmp_path):
    """A step's outcome publishes the steps it makes ready, confirmed before its ack, as a
    publish_to output is: its queue's qos is its prefetch plus the allowance (not opened)."""
    from fastq.autosize import plan_app
    from fastq.engine.pump import CONFIRM_ALLOWANCE
    from fastq.engine.supervisor import Supervisor

    app = fastq.App("allowance", broker=AMQP_URL, result_store=f"sqlite:///{tmp_path / 'r.db'}")
    wf = app.workflow("w")

    @wf.step(queue="steps")
    def one(n: int) -> int:
        return n

    @app.task(queue="plain")
    def plain(n: int) -> None:
        return None

    queues = ["steps", "plain"]
    plan = plan_app(app, queues)
    sup = Supervisor(app, "allowance:app", plan, app.config, queues)
    prefetch = {q.name: q.prefetch for q in plan.queues}
    assert sup.pumps.qos("steps") == prefetch["steps"] + CONFIRM_ALLOWANCE
    assert sup.pumps.qos("plain") == prefetch["plain"]


def test_result_waits_without_a_busy_poll_reading_the_run_row_alone(monkeypatch):
    """Looks at a waited run: 1 ms apart at first, doubling up to 50 ms (never closer: no busy
    poll, at most 20 a second once waiting long), each the run's row alone; the whole status is
    read once, for the timeout's message."""
    from fastq.workflow import api

    app = fastq.App("looks", broker="memory://unit-looks")
    wf = app.workflow("w", keep=None)  # no expiry thread: every counted look is result()'s

    @wf.step()
    def one(n: int) -> int:
        return n

    run_id = wf.start(1)  # never drained: it stays running
    looks: list[float] = []
    statuses: list[str] = []
    real_transaction, real_status = api.transaction, api.read_status

    def counting(app_, work, write):
        looks.append(time.monotonic())
        return real_transaction(app_, work, write)

    def status(app_, rid):
        statuses.append(rid)
        return real_status(app_, rid)

    monkeypatch.setattr(api, "transaction", counting)
    monkeypatch.setattr(api, "read_status", status)
    with pytest.raises(TimeoutError, match=r"did not end within 0.5 s; not ended: one"):
        wf.result(run_id, timeout=0.5)
    assert statuses == [run_id]
    gaps = [b - a for a, b in itertools.pairwise(looks)]
    assert len(gaps) <= 6 + 0.5 * 20 + 2
    for i, gap in enumerate(gaps[:-2]):  # then the look cut by the deadline, and the status
        assert gap >= min(0.001 * 2**i, 0.05) * 0.95, (i, gaps)
