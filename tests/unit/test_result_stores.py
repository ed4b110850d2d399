"""Results without worker processes: the options, the checks made when the app is defined, the
stores (memory, SQLite in the ack's transaction), expiry and the wake-up socket."""

from __future__ import annotations

import asyncio
import threading
import time

import msgspec
import pytest

import fastq
from fastq import _notify, results
from fastq.broker.base import Message, Output, StoredResult
from fastq.broker.memory import MemoryBroker
from fastq.broker.sqlite import SqliteBroker


class Item(msgspec.Struct):
    name: str


def test_result_ttl_must_be_positive():
    app = fastq.App("t", broker="memory://results-ttl")
    for bad in (0, -1, "10"):
        with pytest.raises(fastq.ConfigError, match="result_ttl must be > 0"):
            app.task(result_ttl=bad)(lambda: None)


def test_publish_to_is_checked_when_the_app_is_defined():
    app = fastq.App("t", broker="memory://results-check")

    @app.task(queue="b")
    def takes_item(item: Item) -> None: ...

    @app.task(queue="b2")
    def takes_two(a: int, b: int) -> None: ...

    with pytest.raises(fastq.ConfigError, match="returns int, but publish_to=.*takes item: Item"):

        @app.task(queue="a", publish_to=takes_item)
        def gives_int(n: int) -> int:
            return n

    with pytest.raises(fastq.ConfigError, match="takes 2 arguments"):

        @app.task(queue="a2", publish_to=takes_two)
        def gives(n: int) -> int:
            return n

    with pytest.raises(
        fastq.ConfigError, match="publish_to must be a queue name, a fastq.Route or a Task"
    ):

        @app.task(queue="a3", publish_to=42)  # type: ignore[arg-type]
        def gives3(n: int) -> int:
            return n

    with pytest.raises(fastq.ConfigError, match="result_ttl is for tasks"):

        @app.consumer("raw", result_ttl=10)
        def raw(body: bytes) -> None: ...

    @app.task(queue="a4", publish_to=takes_item)
    def gives_item(n: int) -> Item:
        return Item(str(n))

    assert gives_item.publish_to is takes_item
    assert gives_item.outputs(Item("x"), 1000)[0][0] == "b"


def test_outputs_and_values_are_checked_in_words():
    app = fastq.App("t", broker="memory://results-values")

    @app.task(queue="a", publish_to="out")
    def produce(n: int) -> list[int]:
        return [n]

    assert produce.encode_value([1, 2], 100) == msgspec.msgpack.encode([1, 2])
    with pytest.raises(fastq.MessageError, match="does not encode as its return annotation"):
        produce.encode_value(["x"], 100)
    with pytest.raises(fastq.MessageError, match="over max_message_bytes=10; return less"):
        produce.encode_value(list(range(50)), 10)
    assert [b for _, _, b in produce.outputs([b"a", b"b"], 100)] == [b"a", b"b"]
    assert produce.outputs(None, 100) == []
    [(queue, _, body)] = produce.outputs([1, 2], 100)
    assert (queue, body) == ("out", msgspec.msgpack.encode([1, 2]))


def test_a_broker_without_results_says_to_give_a_result_store():
    app = fastq.App("t", broker="amqp://guest:secret@127.0.0.1:5672/")

    @app.task(queue="a", result_ttl=10)
    def keep(n: int) -> int:
        return n

    with pytest.raises(fastq.ConfigError, match="keeps no results.*result_store=") as e:
        keep.result("x", timeout=0)
    assert "secret" not in str(e.value)
    with_store = fastq.App("t", broker="amqp://127.0.0.1/", result_store="memory://rs")
    assert with_store.result_store.keeps_results


def _ok(value: object) -> bytes:
    return results.success(msgspec.msgpack.encode(value))


def test_memory_results_expire_then_their_tombstones_go():
    broker = MemoryBroker("memory://results-expiry")
    asyncio.run(broker.put_results([StoredResult("m1", "t", _ok(5), 0.2)]))
    decoder = msgspec.msgpack.Decoder(int)
    assert results.read(broker.get_result("m1") or b"", decoder, message_id="m1", task="t") == 5
    assert broker.get_result("m2") is None
    time.sleep(0.25)
    with pytest.raises(fastq.ResultExpired, match="expired"):
        broker.get_result("m1")
    asyncio.run(broker.put_results([StoredResult("m3", "t", _ok(1), 60)]))  # expiry on write
    assert broker._results["m1"][0] is None  # a tombstone
    time.sleep(0.25)
    asyncio.run(broker.put_results([StoredResult("m4", "t", _ok(1), 60)]))
    assert "m1" not in broker._results and broker.get_result("m1") is None


def test_sqlite_stores_results_and_outputs_in_the_acks_transaction(tmp_path):
    broker = SqliteBroker(f"sqlite:///{tmp_path / 'q.db'}")

    async def go() -> None:
        await broker.open()
        await broker.publish("in", [Message(b"x", "m1")])
        [d] = await broker.fetch("in", 10, timeout=1)
        failed = results.failure("ValueError", "no", "Traceback...", "ValueError: no")
        await broker.exchange(
            "in",
            ack=[d.tag],
            results=[
                StoredResult("m1", "t", _ok({"a": 1}), 60),
                StoredResult("m0", "t", failed, 60),
            ],
            outputs=[Output("out", Message(b"y", "o1"))],
        )
        [out] = await broker.fetch("out", 10, timeout=1)
        assert (out.body, out.message_id) == (b"y", "o1")
        assert (await broker.queue_depth("in")).ready == 0
        await broker.close()

    asyncio.run(go())
    reader = SqliteBroker(f"sqlite:///{tmp_path / 'q.db'}")  # another connection reads it
    value = results.read(
        reader.get_result("m1") or b"",
        msgspec.msgpack.Decoder(dict[str, int]),
        message_id="m1",
        task="t",
    )
    assert value == {"a": 1}
    with pytest.raises(fastq.TaskFailed, match="failed for good: ValueError: no") as e:
        results.read(
            reader.get_result("m0") or b"", msgspec.msgpack.Decoder(int), message_id="m0", task="t"
        )
    assert (e.value.error_type, e.value.traceback) == ("ValueError", "Traceback...")


def test_the_wakeup_socket_wakes_sync_and_async_waiters():
    listener = _notify.listener()
    assert _notify.current() is listener and listener.address.startswith("fastq-wait-")
    poker = _notify.Poker()
    w = listener.expect("id-1")
    threading.Timer(0.05, poker.poke, [[(listener.address, "id-1")]]).start()
    assert w.event is not None and w.event.wait(5)
    listener.done("id-1", w)

    async def wait_async() -> bool:
        loop = asyncio.get_running_loop()
        waiter = listener.expect("id-2", loop)
        loop.call_later(0.05, poker.poke, [(listener.address, "id-2")])
        assert waiter.future is not None
        await asyncio.wait_for(waiter.future, 5)
        listener.done("id-2", waiter)
        return True

    assert asyncio.run(wait_async())
    many = [listener.expect(f"id-{i}") for i in range(3, 300)]
    poker.poke([(listener.address, f"id-{i}") for i in range(3, 300)])  # a few datagrams
    assert all(w.event is not None and w.event.wait(5) for w in many)
    poker.poke([("not-ours", "x"), ("fastq-wait-gone", "x")])  # ignored, no error
    poker.close()


def test_a_route_needs_a_broker_with_exchanges(tmp_path):
    from fastq.engine.supervisor import run_app

    with pytest.raises(fastq.ConfigError, match="names starting with 'amq.'"):
        fastq.Route(exchange="amq.topic")
    with pytest.raises(fastq.ConfigError, match="exchange_kind must be one of"):
        fastq.Route(exchange="x", exchange_kind="nope")
    app = fastq.App("t", broker=f"sqlite:///{tmp_path / 'q.db'}")

    @app.task(queue="a", publish_to=fastq.Route(exchange="events", routing_key="made"))
    def make(n: int) -> int:
        return n

    with pytest.raises(fastq.ConfigError, match="needs a broker with exchanges .amqp://."):
        run_app(app, "nowhere:app")
