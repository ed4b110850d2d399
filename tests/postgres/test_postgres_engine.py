"""`fastq worker` trees on PostgreSQL, counted exactly: each handler appends its number to a
file (O_APPEND, one write per line), so every test knows what ran and how often."""

from __future__ import annotations

import collections
import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest
from faulttree import Tree, enqueue

from fastq.testing import postgres_restarted, wait_until

POISON = """

@app.task(queue="poison", max_retries=2, retry_backoff=0.01)
def flaky(n: int) -> None:
    _record(b"flaky %d\\n" % n)
    raise RuntimeError("always fails %d" % n)

@app.task(queue="poison")
def fine(n: int) -> None:
    _record(b"fine %d\\n" % n)

@app.task(queue="poison")
def crash(n: int) -> None:
    import signal
    _record(b"crash %d\\n" % n)
    os.kill(os.getpid(), signal.SIGKILL)

@app.task(queue="poison")
def big(text: str) -> None:
    _record(b"big\\n")
"""


@pytest.fixture
def tree(tmp_path: Path, pg_url: str):
    t = Tree(tmp_path, pg_url + "&lease=2", extra=POISON)
    yield t
    t.close()


def test_100000_messages_through_two_workers_run_exactly_once(tree):
    enqueue(tree, 100_000)
    proc = tree.start("--processes", "2", "--queue", tree.q)
    tree.wait_for_distinct(100_000, timeout=300)
    assert tree.stop(proc) == 0
    counts = collections.Counter(tree.lines())
    assert len(counts) == 100_000 and set(counts.values()) == {1}


def test_a_worker_sigkilled_three_times_loses_nothing(tree):
    enqueue(tree, 20_000, "slow")
    proc = tree.start("--processes", "2", "--queue", f"{tree.q}.slow")
    tree.wait_for_workers(proc, 2)
    for kill in range(3):
        tree.wait_for_distinct(3_000 * (kill + 1))
        victim = tree.workers(proc)[0]
        victim.kill()  # SIGKILL
        wait_until(
            lambda victim=victim: (
                victim.pid not in [w.pid for w in tree.workers(proc)]
                and len(tree.workers(proc)) >= 2
            ),
            30,
            tree.logtext,
        )
    tree.wait_for_distinct(20_000)
    assert tree.stop(proc) == 0
    assert len(set(tree.lines())) == 20_000
    assert tree.logtext(proc).count("exited with -9") == 3


def test_a_sigkilled_supervisor_s_leases_lapse_and_another_takes_them_over(tree):
    # Given two supervisors on one database, each holding messages
    enqueue(tree, 4_000, "crawl")  # 400 a second per supervisor
    first = tree.start("--processes", "1", "--queue", f"{tree.q}.crawl")
    second = tree.start("--processes", "1", "--queue", f"{tree.q}.crawl")
    tree.wait_for_workers(first, 1)
    tree.wait_for_workers(second, 1)
    tree.wait_for_distinct(500)
    # When the first dies whole, with no chance to give anything back
    tree.kill_tree(first)
    # Then the second finishes everything, the dead one's leased messages after 2 s
    tree.wait_for_distinct(4_000, timeout=120)
    assert tree.stop(second) == 0
    assert len(set(tree.lines())) == 4_000


def _produce(module_dir: str, module: str, producer: int, count: int) -> None:
    sys.path.insert(0, module_dir)
    app = __import__(module)
    base = producer * count
    for start in range(base, base + count, 500):
        app.record.send_many((i,) for i in range(start, min(base + count, start + 500)))


def test_four_producers_and_two_supervisors_on_one_database_run_each_message_once(tree):
    ctx = multiprocessing.get_context("spawn")
    sups = [tree.start("--processes", "1", "--queue", tree.q) for _ in range(2)]
    producers = [
        ctx.Process(target=_produce, args=(str(tree.dir), tree.module, p, 5_000)) for p in range(4)
    ]
    for p in producers:
        p.start()
    for p in producers:
        p.join(120)
        assert p.exitcode == 0
    tree.wait_for_distinct(20_000)
    for proc in sups:
        assert tree.stop(proc) == 0
    counts = collections.Counter(tree.lines())
    assert len(counts) == 20_000 and set(counts.values()) == {1}
    # both supervisors took part
    assert all("worker 0 pinned to cpu" in tree.logtext(p) for p in sups)


def test_postgresql_restarted_mid_run_loses_nothing(tree):
    enqueue(tree, 3_000, "crawl")
    proc = tree.start("--processes", "2", "--queue", f"{tree.q}.crawl")
    tree.wait_for_distinct(400)
    with postgres_restarted():
        pass  # stopped (fast: every connection cut), then started again
    done_at_restart = len(set(tree.lines()))
    assert done_at_restart < 3_000
    tree.wait_for_distinct(3_000, timeout=180)
    assert tree.stop(proc) == 0
    assert len(set(tree.lines())) == 3_000


def test_poison_of_every_kind_is_dead_lettered_with_its_reason_while_the_rest_flow(
    tree, monkeypatch
):
    import fastq.message as m
    from fastq.broker.base import Message

    monkeypatch.setenv("FASTQ_MAX_MESSAGE_BYTES", "1000")
    broker = tree.app.app.broker
    broker.publish_sync("poison", [Message(b"\xc1 not msgpack", "garbage")])
    broker.publish_sync("poison", [Message(m.encode("no.such.task", (1,))[1], "unknown")])
    broker.publish_sync(
        "poison", [Message(m.encode(tree.app.fine.name, ("not an int",))[1], "invalid")]
    )
    flaky = tree.app.flaky.send(7)
    killer = tree.app.crash.send(1)
    oversized = tree.app.big.send("x" * 5000)
    tree.app.fine.send_many((i,) for i in range(100))
    proc = tree.start("--processes", "2", "--queue", "poison")
    wait_until(lambda: len(broker.dead_letters("poison")) >= 6, 90, tree.logtext)
    wait_until(lambda: tree.lines().count("fine") >= 100, 30, tree.logtext)
    assert tree.stop(proc) == 0
    reasons = {d.message_id: d.reason for d in broker.dead_letters("poison")}
    assert set(reasons) == {"garbage", "unknown", "invalid", flaky, killer, oversized}
    assert reasons["garbage"].startswith("undecodable: body of 13 bytes is not a fastq task")
    assert reasons["unknown"].startswith("unknown task 'no.such.task'")
    assert reasons["invalid"].startswith(f"invalid arguments for {tree.app.fine.name}")
    assert reasons[flaky] == "RuntimeError: always fails 7 (after 3 attempts)"
    assert reasons[killer] == "killed its worker 3 times (last exit code -9)"
    assert reasons[oversized].endswith("bytes exceeds max_message_bytes=1000")
    lines = tree.lines()
    assert (lines.count("fine"), lines.count("crash")) == (100, 3)
    # flaky ran its 3 attempts; once more if a crash killed the worker it shared (at least once)
    assert lines.count("flaky") in (3, 4)
    assert lines.count("big") == 0


def test_a_bad_password_at_start_is_one_line_and_exit_2(tmp_path, postgres_url):
    url = postgres_url.replace("postgresql://postgres@", "postgresql://nobody:hunter2@")
    url = url.replace("@127.0.0.1:5432", "@127.0.0.1:1")
    (tmp_path / "badpg.py").write_text(
        f"import fastq\napp = fastq.App('x', broker={url!r})\n"
        "@app.task\ndef nothing() -> None:\n    pass\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "fastq", "worker", "badpg:app"],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2, done.stderr
    assert "hunter2" not in done.stderr + done.stdout
    # the error is the last line, in one line (the plan's INFO lines come before it)
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "fastq worker: cannot connect to PostgreSQL at postgresql://nobody:***@127.0.0.1:1/"
        )
    )


def test_sends_in_the_callers_transaction_run_once_if_it_commits_and_never_if_not(
    tree, postgres_url, pg_schema
):
    import asyncio

    import asyncpg
    import psycopg

    record = tree.app.record
    tree.app.app.broker.bridge().run(tree.app.app.broker.sql.prepare, "")  # the schema exists

    async def through_asyncpg() -> None:
        conn = await asyncpg.connect(postgres_url)
        try:
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await record.send_async(1, connection=conn)
                    raise RuntimeError("the caller's own write failed")
            async with conn.transaction():
                await record.send_async(2, connection=conn)
                await record.send_many_async([(3,), (4,)], connection=conn)
        finally:
            await conn.close()

    asyncio.run(through_asyncpg())
    with psycopg.connect(postgres_url) as conn:
        with pytest.raises(RuntimeError), conn.transaction():
            record.send(5, connection=conn)
            raise RuntimeError("rolled back")
        with conn.transaction():
            record.send(6, connection=conn)
    proc = tree.start("--processes", "2", "--queue", tree.q)
    tree.wait_for_distinct(4)
    assert tree.stop(proc) == 0
    # the committed four ran once each; the rolled-back two were never in the table
    assert sorted(tree.lines()) == ["2", "3", "4", "6"]
    left = tree.app.app.broker.bridge().run(
        lambda c: c.fetchval(f"SELECT count(*) FROM {pg_schema}.messages"), ""
    )
    assert left == 0
