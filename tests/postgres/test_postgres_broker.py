"""The PostgreSQL broker in one process, on a real server: what each call does to the rows."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from fastq.broker import open_broker
from fastq.broker.base import Message, Retry, StoredResult
from fastq.broker.postgres import PostgresBroker
from fastq.errors import BrokerConnectionError, ConfigError, ResultExpired


def _messages(n: int, prefix: str = "m") -> list[Message]:
    return [Message(b"%s%d" % (prefix.encode(), i), f"{prefix}{i}") for i in range(n)]


def run(coro):
    return asyncio.run(coro)


def test_settling_acks_retries_buries_and_releases_only_what_it_names(pg_url):
    async def go() -> None:
        b = open_broker(pg_url)
        await b.open()
        try:
            await b.publish("q", _messages(5))
            got = await b.fetch("q", 10, timeout=1)
            assert [d.body for d in got] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
            assert {d.attempts for d in got} == {1}
            t = [d.tag for d in got]
            again = await b.exchange(
                "q",
                ack=[t[0]],
                retry=[Retry(t[1], 0.3, "boom")],
                dead=[(t[2], "bad input")],
                release=[t[3]],
                fetch=10,
                timeout=0,
            )
            # the released one is back at once, with its delivery counted
            assert [(d.body, d.attempts, d.retries) for d in again] == [(b"m3", 2, 0)]
            depth = await b.queue_depth("q")
            assert (depth.ready, depth.unacked, depth.delayed, depth.dead) == (0, 2, 1, 1)
            # the retry comes back after its delay, counted as a retry
            retried = await b.fetch("q", 10, timeout=5)
            assert [(d.body, d.retries) for d in retried] == [(b"m1", 1)]
            dead = b.dead_letters("q")
            assert [(d.message_id, d.reason, d.attempts) for d in dead] == [("m2", "bad input", 1)]
            # settling the same tags again is ignored (the supervisor may send them twice)
            await b.settle("q", ack=[t[0]], dead=[(t[2], "again")])
            assert len(b.dead_letters("q")) == 1
        finally:
            await b.close()

    run(go())


def test_another_owner_cannot_settle_and_gets_the_messages_once_the_leases_lapse(pg_url):
    async def go() -> None:
        first, second = open_broker(pg_url + "&lease=1"), PostgresBroker(pg_url + "&lease=1")
        assert first is not second
        await first.open()
        await second.open()
        try:
            await first.publish("q", _messages(3))
            held = await first.fetch("q", 10, timeout=1)
            first._tasks[1].cancel()  # its renewer stops: as if its host died
            assert await second.fetch("q", 10, timeout=0) == []
            await second.settle("q", ack=[d.tag for d in held])  # not its leases: ignored
            taken = await second.fetch("q", 10, timeout=5)
            assert sorted(d.body for d in taken) == [b"m0", b"m1", b"m2"]
            assert {d.attempts for d in taken} == {2}
            await first.settle("q", ack=[d.tag for d in held])  # lapsed: ignored too
            await second.settle("q", ack=[d.tag for d in taken])
            depth = await second.queue_depth("q")
            assert (depth.ready, depth.unacked) == (0, 0)
        finally:
            await first.close()
            await second.close()

    run(go())


def test_closing_gives_back_what_it_held_at_once(pg_url):
    async def go() -> None:
        a, b = PostgresBroker(pg_url), PostgresBroker(pg_url)
        await a.open()
        await b.open()
        try:
            await a.publish("q", _messages(4))
            assert len(await a.fetch("q", 10, timeout=1)) == 4
            await a.close()
            assert len(await b.fetch("q", 10, timeout=1)) == 4
        finally:
            await b.close()

    run(go())


def test_an_idle_fetch_is_woken_by_the_notify_of_a_commit_not_by_polling(pg_url):
    async def go() -> None:
        b = PostgresBroker(pg_url + "&poll=60")  # a fallback look only every minute
        await b.open()
        try:
            await b.fetch("q", 1, timeout=0)  # the queue's wake-up is registered
            loop = asyncio.get_running_loop()
            waiting = asyncio.create_task(b.fetch("q", 10, timeout=30))
            await asyncio.sleep(0.2)
            start = time.monotonic()
            await loop.run_in_executor(None, b.publish_sync, "q", _messages(1))
            got = await waiting
            assert [d.body for d in got] == [b"m0"]
            assert time.monotonic() - start < 10  # far below the 60 s poll: the NOTIFY woke it
        finally:
            await b.close()

    run(go())


def test_a_delayed_message_is_not_claimed_before_its_time_and_then_is(pg_url):
    async def go() -> None:
        b = PostgresBroker(pg_url + "&poll=60")
        await b.open()
        try:
            await b.publish("q", [Message(b"later", "later", delay=0.5)])
            start = time.monotonic()
            assert await b.fetch("q", 10, timeout=0) == []
            got = await b.fetch("q", 10, timeout=10)  # woken at its time, not by the 60 s poll
            waited = time.monotonic() - start
            assert [d.body for d in got] == [b"later"]
            assert 0.4 <= waited < 5
        finally:
            await b.close()

    run(go())


def test_results_are_written_with_the_ack_and_expire(pg_url):
    async def go() -> None:
        b = PostgresBroker(pg_url)
        await b.open()
        try:
            await b.publish("q", _messages(1))
            (d,) = await b.fetch("q", 1, timeout=1)
            kept = StoredResult("m0", "t", b"\x01", ttl=0.5)
            await b.exchange("q", ack=[d.tag], results=[kept])
            assert b.get_result("m0") == b"\x01"
            assert b.get_result("unknown") is None
            await asyncio.sleep(0.6)
            with pytest.raises(ResultExpired):
                b.get_result("m0")
        finally:
            await b.close()

    run(go())


def test_dead_letters_are_listed_with_their_reason_and_requeued(pg_url):
    async def go() -> None:
        b = PostgresBroker(pg_url)
        await b.open()
        try:
            await b.publish("q", _messages(3))
            got = await b.fetch("q", 3, timeout=1)
            await b.settle("q", dead=[(d.tag, f"reason {d.message_id}") for d in got])
            dead = b.dead_letters("q")
            assert [(d.message_id, d.reason) for d in dead] == [
                ("m0", "reason m0"),
                ("m1", "reason m1"),
                ("m2", "reason m2"),
            ]
            assert b.requeue_dead_letters([dead[0].id]) == 1
            assert b.requeue_dead_letters(queue="q") == 2
            assert b.dead_letters("q") == []
            again = await b.fetch("q", 10, timeout=1)
            assert [d.body for d in again] == [b"m0", b"m1", b"m2"]
            assert {d.attempts for d in again} == {1}  # fresh counts
        finally:
            await b.close()

    run(go())


def test_enqueue_in_the_callers_asyncpg_transaction_exists_only_if_it_commits(pg_url, postgres_url):
    async def go() -> None:
        b = PostgresBroker(pg_url)
        await b.open()
        conn = await asyncpg.connect(postgres_url)
        try:
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await b.publish_in(conn, "q", _messages(2, "rolled"))
                    raise RuntimeError("the caller's own write failed")
            async with conn.transaction():
                await b.publish_in(conn, "q", _messages(2, "kept"))
            got = await b.fetch("q", 10, timeout=1)
            assert [d.body for d in got] == [b"kept0", b"kept1"]
        finally:
            await conn.close()
            await b.close()

    run(go())


def test_enqueue_in_the_callers_psycopg_transaction_exists_only_if_it_commits(pg_url, postgres_url):
    import psycopg

    b = PostgresBroker(pg_url)
    b.bridge().run(b.sql.prepare, "")  # the schema exists before the caller writes to it
    with psycopg.connect(postgres_url) as conn:
        with pytest.raises(RuntimeError), conn.transaction():
            b.publish_in_sync(conn, "q", _messages(2, "rolled"))
            raise RuntimeError("the caller's own write failed")
        with conn.transaction():
            b.publish_in_sync(conn, "q", _messages(2, "kept"))

    async def go() -> list[bytes]:
        await b.open()
        try:
            return [d.body for d in await b.fetch("q", 10, timeout=1)]
        finally:
            await b.close()

    assert run(go()) == [b"kept0", b"kept1"]


def test_the_wrong_connection_kind_says_which_send_takes_which(pg_url):
    b = PostgresBroker(pg_url)
    with pytest.raises(
        ConfigError,
        match=r"^send\(\.\.\., connection=\.\.\.\) takes a psycopg 3 connection, got object; for "
        r"an asyncpg connection use await send_async\(\.\.\., connection=conn\)$",
    ):
        b.publish_in_sync(object(), "q", _messages(1))
    with pytest.raises(ConfigError, match=r"^send_async\(\.\.\., connection=\.\.\.\) takes an "):
        run(b.publish_in(object(), "q", _messages(1)))


def test_each_tick_is_enqueued_once_by_many_brokers_and_never_an_older_one(pg_url):
    async def go() -> None:
        brokers = [PostgresBroker(pg_url) for _ in range(3)]
        for b in brokers:
            await b.open()
        try:
            assert await brokers[0].last_tick("every-second") is None
            won = []
            for tick in (100.0, 101.0, 102.0):  # each tick raced by the three brokers at once
                won += await asyncio.gather(
                    *(
                        b.publish_tick("every-second", tick, "q", Message(b"t", f"{i}-{tick}"))
                        for i, b in enumerate(brokers)
                    )
                )
            assert sum(won) == 3
            assert await brokers[1].last_tick("every-second") == 102.0
            # a late supervisor never enqueues a tick older than the latest
            assert not await brokers[0].publish_tick("every-second", 101.5, "q", Message(b"", "x"))
            depth = await brokers[2].queue_depth("q")
            assert depth.ready == 3
        finally:
            for b in brokers:
                await b.close()

    run(go())


def test_a_unique_key_holds_until_its_message_is_acked(pg_url):
    async def go() -> None:
        b = PostgresBroker(pg_url)
        await b.open()
        try:
            first = Message(b"1", "first", unique_key="k")
            assert await b.publish_unique("q", first) == "first"
            assert await b.publish_unique("q", Message(b"2", "second", unique_key="k")) == "first"
            (d,) = await b.fetch("q", 10, timeout=1)
            await b.settle("q", retry=[Retry(d.tag, 0.0, "again")])  # a retry keeps the key
            assert b.publish_unique_sync("q", Message(b"3", "third", unique_key="k")) == "first"
            (d,) = await b.fetch("q", 10, timeout=1)
            await b.settle("q", ack=[d.tag])
            assert await b.publish_unique("q", Message(b"4", "fourth", unique_key="k")) == "fourth"
            capped = Message(b"5", "capped", unique_key="c", unique_for=0.2)
            assert await b.publish_unique("q", capped) == "capped"
            await asyncio.sleep(0.3)
            assert await b.publish_unique("q", Message(b"6", "after", unique_key="c")) == "after"
        finally:
            await b.close()

    run(go())


def test_a_newer_schema_is_refused_and_left_untouched(pg_url, postgres_url, pg_schema):
    async def go() -> None:
        b = PostgresBroker(pg_url)
        await b.open()
        await b.publish("q", _messages(1))
        await b.close()
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(
                f"UPDATE {pg_schema}.meta SET value = '99' WHERE key = 'schema_version'"
            )
            with pytest.raises(
                ConfigError,
                match=rf"^schema '{pg_schema}' holds fastq tables of version 99, newer than this "
                r"fastq's 1; upgrade fastq on this host, or use another \?schema=$",
            ):
                await PostgresBroker(pg_url).open()
            assert await conn.fetchval(f"SELECT count(*) FROM {pg_schema}.messages") == 1
        finally:
            await conn.close()

    run(go())


def test_bad_urls_are_config_errors_that_mask_the_password():
    with pytest.raises(
        ConfigError,
        match=r"^schema='Bad-Name' in postgresql://u:\*\*\*@h/db\?schema=Bad-Name must be a "
        r"plain lowercase identifier \(letters, digits, _; at most 63\): fastq names its "
        r"tables after it$",
    ):
        PostgresBroker("postgresql://u:secret@h/db?schema=Bad-Name")
    with pytest.raises(ConfigError, match=r"^'postgresql://u:\*\*\*@h' is not a PostgreSQL"):
        PostgresBroker("postgresql://u:secret@h")


def test_an_unreachable_server_is_a_connection_error_without_the_password():
    b = PostgresBroker("postgresql://postgres:hunter2@127.0.0.1:1/test")
    with pytest.raises(BrokerConnectionError) as caught:
        run(b.open())
    text = str(caught.value)
    assert "hunter2" not in text
    assert text.startswith("cannot connect to PostgreSQL at postgresql://postgres:***@127.0.0.1:1/")


def test_a_broker_that_deleted_20000_rows_vacuums_the_messages_table(pg_url, pg_schema):
    from fastq.broker.postgres import VACUUM_EVERY

    async def go() -> None:
        b = PostgresBroker(pg_url)
        await b.open()
        try:
            await b.publish("q", _messages(VACUUM_EVERY))
            acked = 0
            while acked < VACUUM_EVERY:
                got = await b.fetch("q", 1_000, timeout=1)
                await b.settle("q", ack=[d.tag for d in got])
                acked += len(got)
            # Then one VACUUM ran (not autovacuum: this test is over before its first look)
            deadline = time.monotonic() + 30
            count = 0
            while time.monotonic() < deadline and not count:
                await asyncio.sleep(0.2)
                count = await b._call(
                    lambda c: c.fetchval(
                        "SELECT vacuum_count FROM pg_stat_all_tables "
                        "WHERE schemaname = $1 AND relname = 'messages'",
                        pg_schema,
                    ),
                    "",
                )
            assert count == 1
        finally:
            await b.close()

    run(go())
