"""The broker contract, on memory:// and on sqlite:/// (a file in a temporary directory)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from fastq.broker import mask_url, open_broker
from fastq.broker.base import Message, QueueDepth, Retry
from fastq.errors import ConfigError

_names = itertools.count()


@pytest.fixture(params=["memory", "sqlite"])
def url(request, tmp_path):
    if request.param == "memory":
        return f"memory://unit-{next(_names)}"
    return f"sqlite:///{tmp_path}/q.db?lease=1"


def run(coro):
    return asyncio.run(coro)


def msgs(n, prefix=b"m"):
    return [Message(prefix + b"%d" % i, f"id-{i}") for i in range(n)]


def test_fetch_returns_what_was_published_in_order_and_ack_removes_it(url):
    async def main():
        b = open_broker(url)
        await b.open()
        await b.publish("q", msgs(5))
        got = await b.fetch("q", 10, timeout=1)
        assert [d.body for d in got] == [b"m0", b"m1", b"m2", b"m3", b"m4"]
        assert [d.message_id for d in got] == [f"id-{i}" for i in range(5)]
        assert {d.attempts for d in got} == {1} and {d.retries for d in got} == {0}
        assert await b.queue_depth("q") == QueueDepth(ready=0, unacked=5, delayed=0)
        await b.settle("q", ack=[d.tag for d in got])
        assert await b.queue_depth("q") == QueueDepth(0, 0, 0)
        assert await b.fetch("q", 10, timeout=0.05) == []
        await b.close()

    run(main())


def test_fetch_takes_at_most_max_messages_and_wakes_on_a_publish(url):
    async def main():
        b = open_broker(url)
        await b.open()
        b.publish_sync("q", msgs(3))
        assert len(await b.fetch("q", 2, timeout=1)) == 2
        assert len(await b.fetch("q", 2, timeout=1)) == 1
        later = asyncio.get_running_loop().call_later(0.05, b.publish_sync, "q", msgs(1, b"late"))
        got = await b.fetch("q", 2, timeout=5)
        assert [d.body for d in got] == [b"late0"]
        later.cancel()
        await b.close()

    run(main())


def test_retry_comes_back_after_its_delay_counted_and_dead_letters_keep_their_reason(url):
    async def main():
        b = open_broker(url)
        await b.open()
        await b.publish("q", msgs(2))
        first, second = await b.fetch("q", 2, timeout=1)
        await b.settle(
            "q",
            retry=[Retry(first.tag, 0.2, "RuntimeError: flaky")],
            dead=[(second.tag, "ValueError: bad payload")],
        )
        assert await b.queue_depth("q") == QueueDepth(ready=0, unacked=0, delayed=1, dead=1)
        assert await b.fetch("q", 5, timeout=0.05) == []  # not before its delay
        (again,) = await b.fetch("q", 5, timeout=2)
        assert (again.body, again.attempts, again.retries) == (b"m0", 2, 1)
        (dead,) = b.dead_letters("q")
        assert (dead.body, dead.message_id, dead.reason, dead.attempts) == (
            b"m1",
            "id-1",
            "ValueError: bad payload",
            1,
        )
        # A dead letter goes back on request, and comes out like a new message
        assert b.requeue_dead_letters(queue="q") == 1
        assert b.dead_letters("q") == []
        (revived,) = await b.fetch("q", 5, timeout=1)
        assert (revived.body, revived.attempts, revived.retries) == (b"m1", 1, 0)
        await b.close()

    run(main())


def test_released_deliveries_are_deliverable_again_at_once(url):
    async def main():
        b = open_broker(url)
        await b.open()
        await b.publish("q", msgs(3))
        got = await b.fetch("q", 3, timeout=1)
        await b.settle("q", release=[d.tag for d in got[1:]], ack=[got[0].tag])
        again = await b.fetch("q", 3, timeout=1)
        assert [(d.body, d.attempts) for d in again] == [(b"m1", 2), (b"m2", 2)]
        await b.close()

    run(main())


def test_close_hands_back_what_was_not_settled(url):
    async def main():
        b = open_broker(url)
        await b.open()
        await b.publish("q", msgs(2))
        await b.fetch("q", 2, timeout=1)
        await b.close()
        b = open_broker(url)
        await b.open()
        assert [d.body for d in await b.fetch("q", 5, timeout=1)] == [b"m0", b"m1"]
        await b.close()

    run(main())


def test_headers_and_delay_travel_with_the_message(url):
    async def main():
        b = open_broker(url)
        await b.open()
        await b.publish("q", [Message(b"x", "a", {"k": "v"}, delay=0.2)])
        assert await b.fetch("q", 1, timeout=0.05) == []
        (d,) = await b.fetch("q", 1, timeout=2)
        assert d.headers == {"k": "v"}
        await b.close()

    run(main())


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("sqlite://relative.db", r"is not a SQLite broker URL; use sqlite:///relative/path.db"),
        ("sqlite:///q.db?lease=0", r"lease='0' in sqlite:///q.db\?lease=0 must be a number >= 1.0"),
        ("sqlite:///q.db?synchronous=off", r"synchronous='off' .* must be 'normal' or 'full'"),
        ("redis://u:secret@h/0", r"^unknown broker URL 'redis://u:\*\*\*@h/0'"),
    ],
)
def test_bad_broker_urls_say_what_to_write_and_never_show_a_password(bad, message):
    with pytest.raises(ConfigError, match=message) as exc:
        open_broker(bad)
    assert "secret" not in str(exc.value)


def test_mask_url_hides_the_password_only():
    assert mask_url("amqp://guest:guest@127.0.0.1:5672/vh") == "amqp://guest:***@127.0.0.1:5672/vh"
    assert mask_url("sqlite:///fastq.db") == "sqlite:///fastq.db"


def test_memory_urls_name_one_broker_per_process():
    assert open_broker("memory://shared") is open_broker("memory://shared")
    assert open_broker("memory://shared") is not open_broker("memory://other")


def test_exchange_settles_and_claims_in_one_call(url):
    async def main():
        b = open_broker(url)
        await b.open()
        await b.publish("q", msgs(6))
        first = await b.exchange("q", fetch=2)
        # When two are acked, one retried and one dead-lettered as the next batch is claimed
        got = await b.exchange(
            "q", ack=[first[0].tag], retry=[Retry(first[1].tag, 60.0, "later")], fetch=3
        )
        assert [d.body for d in got] == [b"m2", b"m3", b"m4"]
        got2 = await b.exchange(
            "q", ack=[got[0].tag, got[1].tag], dead=[(got[2].tag, "bad")], fetch=10
        )
        # Then the books balance: m5 delivered, m1 delayed, m4 dead, the rest gone
        assert [d.body for d in got2] == [b"m5"]
        assert await b.queue_depth("q") == QueueDepth(ready=0, unacked=1, delayed=1, dead=1)
        assert [(d.body, d.reason) for d in b.dead_letters("q")] == [(b"m4", "bad")]
        assert await b.exchange("q", ack=[got2[0].tag]) == []
        assert await b.queue_depth("q") == QueueDepth(ready=0, unacked=0, delayed=1, dead=1)
        await b.close()

    run(main())


def test_a_fetch_waiting_on_an_empty_queue_ends_when_woken(url):
    async def main():
        b = open_broker(url)
        await b.open()
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, wake.set)
        t = loop.time()
        assert await b.fetch("q", 10, timeout=30, wake=wake) == []
        assert loop.time() - t < 10  # woken, not timed out (30 s)
        assert await b.exchange("q", fetch=10, timeout=30, wake=wake) == []  # already set: no wait
        await b.close()

    run(main())


def test_a_sqlite_exchange_while_another_writer_holds_the_lock_waits_its_turn(tmp_path):
    import sqlite3

    async def main():
        b = open_broker(f"sqlite:///{tmp_path}/q.db")
        await b.open()
        await b.publish("q", msgs(3))
        # Given another process's transaction holding the write lock for 0.2 s
        other = sqlite3.connect(tmp_path / "q.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        asyncio.get_running_loop().call_later(0.2, other.execute, "COMMIT")
        # When the supervisor's exchange comes meanwhile, it waits its turn instead of failing
        got = await b.exchange("q", fetch=10)
        assert [d.body for d in got] == [b"m0", b"m1", b"m2"]
        assert await b.exchange("q", ack=[d.tag for d in got]) == []
        assert await b.queue_depth("q") == QueueDepth(0, 0, 0)
        other.close()
        await b.close()

    run(main())
