"""fastq.Pool through real worker processes: results equal a local loop, errors come back with
the worker's traceback, killed workers cost no item, nothing is left behind."""

from __future__ import annotations

import asyncio
import collections
import math
import os
import signal
import sys
import threading
import time
import types
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastq
from fastq.codec import RemoteTraceback
from fastq.testing import wait_until

sys.path.insert(0, str(Path(__file__).parent))
import poolfns
from poolfns import Point

SEEN_PIDS: set[int] = set()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module", autouse=True)
def no_process_left_behind():
    yield
    alive = [pid for pid in SEEN_PIDS if _alive(pid)]
    assert not alive, f"pool worker processes still running after the pool tests: {alive}"


@pytest.fixture(scope="module")
def pool():
    with fastq.Pool() as p:
        SEEN_PIDS.update(p.pids)
        yield p
    SEEN_PIDS.update(pid for pid in p.pids if pid)


scalars = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.none(),
    st.booleans(),
)
anything = st.one_of(
    scalars,
    st.integers(-(2**80), 2**80),
    st.tuples(st.integers(), st.text(max_size=3)),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
    st.frozensets(st.integers(), max_size=3),
    st.builds(Point, st.integers(-(2**63), 2**63 - 1), st.tuples(st.text(max_size=3))),
)
batches = st.one_of(
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=400),  # msgpack both ways
    st.lists(scalars, max_size=200),  # msgpack, mixed types
    st.lists(st.builds(Point, st.integers(0, 1000)), max_size=100),  # one Struct type
    st.lists(anything, max_size=200),  # pickle
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(xs=batches, batch_size=st.sampled_from(["auto", 1, 7]))
def test_results_equal_a_local_loop(pool, xs, batch_size):
    expected = [poolfns.describe(x) for x in xs]  # the type and repr the worker saw
    assert pool.map(poolfns.describe, xs, batch_size=batch_size) == expected
    assert list(pool.imap(poolfns.describe, xs, batch_size=batch_size)) == expected
    unordered = list(pool.imap_unordered(poolfns.describe, iter(xs), batch_size=batch_size))
    assert collections.Counter(unordered) == collections.Counter(expected)
    back = pool.map(poolfns.identity, xs, batch_size=batch_size)
    assert [(type(v), v) for v in back] == [(type(x), x) for x in xs]


def test_structs_and_bytes_travel_as_themselves(pool):
    points = [Point(i, ("a",)) for i in range(1000)]
    assert pool.map(poolfns.shift, points) == [Point(i + 1, ("a", "seen")) for i in range(1000)]
    blob = os.urandom(1 << 20)
    assert pool.map(poolfns.identity, [blob, b""]) == [blob, b""]
    # buffers arrive as bytes (documented): they travel raw, not pickled
    assert pool.map(poolfns.describe, [memoryview(b"ab")]) == ["bytes:b'ab'"]
    assert pool.map(poolfns.identity, [2**100, -(2**70), "\ud800"]) == [2**100, -(2**70), "\ud800"]


def test_map_of_many_items_in_order(pool):
    xs = list(range(200_000))
    assert pool.map(poolfns.double, xs) == [2 * x for x in xs]
    assert list(pool.imap(poolfns.double, (x for x in xs))) == [2 * x for x in xs]
    assert sorted(pool.imap_unordered(poolfns.double, xs)) == [2 * x for x in xs]
    assert pool.map(poolfns.double, []) == []
    assert len(set(pool.map(poolfns.pid, range(20_000), batch_size=100))) == pool.processes


def test_an_exception_comes_back_with_the_remote_traceback(pool):
    with pytest.raises(ValueError, match="seven is not allowed") as info:
        pool.map(poolfns.fail_on_7, range(100))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "fail_on_7" in cause.tb and "raise ValueError" in cause.tb and "poolfns.py" in cause.tb

    got = []
    with pytest.raises(ValueError):
        for v in pool.imap(poolfns.fail_on_7, range(100), batch_size=3):
            got.append(v)
    assert got == [0, 1, 2, 3, 4, 5, 6]  # every item before the one that raised, in order

    future = pool.submit(poolfns.fail_on_7, 7)
    assert isinstance(future.exception(timeout=60), ValueError)
    with pytest.raises(KeyError):
        pool.map(poolfns.async_fail_on_7, range(20))
    with pytest.raises(fastq.RemoteError, match="Unpicklable: odd") as info:
        pool.map(poolfns.raise_unpicklable, [1])
    assert "raise_unpicklable" in info.value.__cause__.tb
    with pytest.raises(TypeError, match="cannot travel back to the caller"):
        pool.map(poolfns.unpicklable_result, [1])
    with pytest.raises(StopIteration):  # not a quietly short list
        pool.map(poolfns.stop_iteration_on_3, range(10))
    assert pool.map(poolfns.stop_iteration_on_3, [1, 2]) == [1, 2]


def test_after_an_error_map_sends_no_more_of_the_call(pool):
    before = pool.statistics().items_sent
    with pytest.raises(ValueError):
        pool.map(poolfns.fail_on_7, range(1_000_000), batch_size=1)
    assert pool.statistics().items_sent - before < 1000


def test_leaving_an_iteration_early_cancels_the_rest(pool):
    before = pool.statistics().items_sent
    it = pool.imap(poolfns.spin, range(1_000_000), batch_size=10)
    assert [next(it) for _ in range(5)] == [0, 2, 4, 6, 8]
    it.close()
    assert pool.statistics().items_sent - before < 1_000_000
    assert pool.map(poolfns.double, range(10)) == [2 * x for x in range(10)]


def test_submit(pool):
    assert pool.submit(poolfns.add, 1, 2, scale=3).result(timeout=60) == 9
    futures = [pool.submit(poolfns.double, i) for i in range(500)]
    assert [f.result(timeout=60) for f in futures] == [2 * i for i in range(500)]
    assert pool.submit(poolfns.async_double, 4).result(timeout=60) == 8


def test_async_forms_leave_the_event_loop_free(pool):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        mapped = await pool.map_async(poolfns.spin, range(50_000))
        unordered = [v async for v in pool.aimap_unordered(poolfns.async_double, range(5000))]
        t.cancel()
        return mapped, unordered, ticks

    mapped, unordered, ticks = asyncio.run(main())
    assert mapped == [2 * x for x in range(50_000)]
    assert sorted(unordered) == [2 * x for x in range(5000)]
    assert ticks > 10  # the loop ran while the pool worked

    async def failing():
        return await pool.map_async(poolfns.fail_on_7, range(10))

    with pytest.raises(ValueError):
        asyncio.run(failing())


def test_a_thousand_coroutines_at_once_per_process():
    with fastq.Pool(concurrency=1000) as p:
        SEEN_PIDS.update(p.pids)
        p.map(poolfns.async_double, range(10))  # started
        started = time.monotonic()
        results = p.map(poolfns.nap_peak, [1.0] * (1000 * p.processes))
        took = time.monotonic() - started
    peaks = collections.defaultdict(int)
    for pid, peak in results:
        peaks[pid] = max(peaks[pid], peak)
    assert dict(peaks) == dict.fromkeys(peaks, 1000) and len(peaks) == p.processes
    # about one sleep: one after the other would take 1,000 s per process
    assert took < 4.0, f"{1000 * p.processes} naps of 1 s took {took:.1f} s"


def test_kind_io_runs_plain_functions_in_threads():
    with fastq.Pool(kind="io", concurrency=50) as p:
        SEEN_PIDS.update(p.pids)
        p.map(poolfns.double, range(10))
        started = time.monotonic()
        pids = p.map(poolfns.blocking_sleep, [0.2] * 100)
        took = time.monotonic() - started
    assert set(pids) == set(p.pids) - {None} or len(set(pids)) == p.processes
    assert took < 5.0, (
        f"100 blocking sleeps of 0.2 s on {p.processes} x 50 threads took {took:.1f} s"
    )


def test_sigkill_of_a_worker_mid_map_loses_nothing():
    with fastq.Pool() as p:
        SEEN_PIDS.update(p.pids)
        p.map(poolfns.spin, range(1000))
        victim = p.pids[0]
        base = p.statistics().items_done

        def kill_when_under_way():
            wait_until(lambda: p.statistics().items_done - base >= 10_000, 120, interval=0.001)
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_when_under_way)
        killer.start()
        xs = list(range(100_000))
        assert p.map(poolfns.spin, xs) == [2 * x for x in xs]
        killer.join()
        stats = p.statistics()
        assert stats.workers_lost == 1 and stats.items_again > 0
        assert victim not in p.pids and None not in p.pids
        SEEN_PIDS.update(p.pids)
        assert p.map(poolfns.double, range(1000)) == [2 * x for x in range(1000)]  # still usable
        assert len(set(p.map(poolfns.pid, range(20_000), batch_size=100))) == p.processes


def test_an_item_that_kills_every_worker_it_runs_on_raises_worker_lost():
    with fastq.Pool() as p:
        SEEN_PIDS.update(p.pids)
        with pytest.raises(fastq.WorkerLost, match="died .*exit code 3"):
            p.map(poolfns.exit_on_13, range(100))
        assert p.statistics().workers_lost == 3  # whole batch, batch again, then alone
        SEEN_PIDS.update(pid for pid in p.pids if pid)
        assert p.map(poolfns.exit_on_13, [1, 2, 3]) == [1, 2, 3]
        future = p.submit(poolfns.exit_on_13, 13)
        assert isinstance(future.exception(timeout=120), fastq.WorkerLost)
        SEEN_PIDS.update(pid for pid in p.pids if pid)


def test_leaving_the_with_block_leaves_no_process_or_shared_memory():
    with fastq.Pool() as p:
        pids = list(p.pids)
        rings = [r.name for w in p._driver.fleet for r in (w.inbox, w.outbox)]
        assert p.map(poolfns.double, range(10)) == [2 * x for x in range(10)]
    assert not any(_alive(pid) for pid in pids)
    assert not any((Path("/dev/shm") / name).exists() for name in rings)

    with pytest.raises(RuntimeError, match="inside"), fastq.Pool() as p:
        pids = list(p.pids)
        raise RuntimeError("inside")
    assert not any(_alive(pid) for pid in pids)  # an exception terminates


def test_close_join_terminate():
    p = fastq.Pool()
    SEEN_PIDS.update(p.pids)
    with pytest.raises(ValueError, match="close"):
        p.join()
    result = []
    t = threading.Thread(
        target=lambda: result.append(_catch(lambda: p.map(poolfns.spin, range(10_000_000))))
    )
    t.start()
    time.sleep(0.5)
    p.terminate()
    t.join(60)
    assert isinstance(result[0], fastq.PoolClosed)
    with pytest.raises(fastq.PoolClosed):
        p.map(poolfns.double, [1])

    q = fastq.Pool()
    SEEN_PIDS.update(q.pids)
    future = q.submit(poolfns.blocking_sleep, 0.3)
    q.close()
    with pytest.raises(fastq.PoolClosed):
        q.submit(poolfns.double, 1)
    q.join()
    assert future.result(timeout=0) in SEEN_PIDS  # what was submitted before close() finished


def _catch(fn):
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001
        return e


def test_bad_input_says_what_to_change(pool):
    with pytest.raises(TypeError, match="module level"):
        pool.map(lambda x: x, [1])
    with pytest.raises(fastq.ConfigError, match="batch_size"):
        pool.map(poolfns.double, [1], batch_size=0)
    with pytest.raises(TypeError, match="cannot be sent to a pool worker"):
        pool.map(poolfns.identity, [threading.Lock()])
    for kw in ({"kind": "gpu"}, {"concurrency": 0}, {"ring_bytes": 1000}):
        with pytest.raises(fastq.ConfigError):
            fastq.Pool(**kw)
    with fastq.Pool(1, ring_bytes=1 << 16) as small:
        SEEN_PIDS.update(small.pids)
        with pytest.raises(fastq.ConfigError, match="ring_bytes"):
            small.map(poolfns.identity, [b"x" * 100_000])
        # split to fit
        assert small.map(poolfns.identity, [b"x" * 10_000] * 50) == [b"x" * 10_000] * 50
    # a function the workers cannot import fails its items, with the import error
    module = types.ModuleType("only_in_the_caller")
    exec("def f(x):\n    return x\n", module.__dict__)
    sys.modules["only_in_the_caller"] = module
    try:
        with pytest.raises(ModuleNotFoundError, match="only_in_the_caller"):
            pool.map(module.f, [1, 2])
    finally:
        del sys.modules["only_in_the_caller"]
    assert math.isclose(sum(pool.map(poolfns.double, [0.5] * 4)), 4.0)


def test_workers_that_cannot_start_break_the_pool_instead_of_hanging_it():
    p = fastq.Pool()
    SEEN_PIDS.update(p.pids)
    try:
        assert p.map(poolfns.double, [1]) == [2]
        p._driver.executor = (
            "fastq.executors.pool:NoSuchExecutor"  # every worker started from now fails
        )
        for pid in p.pids:
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(fastq.PoolBroken, match="before it was ready 3 times"):
            p.map(poolfns.double, range(100))
        with pytest.raises(fastq.PoolClosed, match="broken"):
            p.map(poolfns.double, [1])
    finally:
        p.terminate()


def test_replies_larger_than_a_batch_would_fit_are_sized_or_refused():
    with fastq.Pool(ring_bytes=1 << 20) as p:
        SEEN_PIDS.update(p.pids)
        # 50 MB of results through 1 MiB rings: batches are cut by the reply bytes seen
        assert p.map(poolfns.kilobyte, range(50_000)) == ["k" * 1000] * 50_000
        with pytest.raises(ValueError, match="more than the pool's ring holds"):
            p.map(poolfns.megabytes, [1])
        assert p.map(poolfns.double, [1, 2]) == [2, 4]


def test_every_exception_of_fn_comes_back_as_itself(pool):
    with pytest.raises(poolfns.Halt, match="stop right there"):
        pool.map(poolfns.raise_base, [1])
    assert isinstance(pool.submit(poolfns.raise_base, 1).exception(timeout=60), poolfns.Halt)
    with pytest.raises(ValueError) as info:  # the text cannot be UTF-8; the exception travels whole
        pool.map(poolfns.surrogate_error, [1])
    assert str(info.value) == "bad \ud800 text"
    with pytest.raises(fastq.RemoteError, match="cannot be rebuilt in the caller"):
        pool.map(poolfns.unrebuildable, [1, 2])
    # async: the first item's error, in order, whichever finished first
    with pytest.raises(ValueError, match="1"):
        pool.map(poolfns.async_fail_1_slowly_and_3, range(6))
    got = []
    with pytest.raises(ValueError, match="1"):
        for v in pool.imap(poolfns.async_fail_1_slowly_and_3, range(6)):
            got.append(v)
    assert got == [0]


def test_loose_structs_come_back_as_they_left():
    values = [poolfns.Loose(1, (1, 2)), poolfns.Loose(True), poolfns.Loose(2, {"a": (3,)})]
    with fastq.Pool(1) as p:
        SEEN_PIDS.update(p.pids)
        back = p.map(poolfns.identity, values)
    assert back == values and [type(v.anything) for v in back] == [tuple, type(None), dict]
    assert type(back[1].x) is bool


def test_kind_io_stop_iteration_is_raised_not_hung():
    with fastq.Pool(1, kind="io", concurrency=4) as p:
        SEEN_PIDS.update(p.pids)
        with pytest.raises(StopIteration):
            p.map(poolfns.stop_iteration, [1])
        with pytest.raises(poolfns.Halt):
            p.map(poolfns.raise_base, [1])


def test_the_callers_iterable_failing_fails_that_call_only(pool):
    with pytest.raises(ZeroDivisionError, match="generator failed"):
        pool.map(poolfns.double, poolfns.bad_iterable())
    assert list(pool.imap(poolfns.double, [1, 2])) == [2, 4]


def test_an_iterator_dropped_unstarted_does_not_hold_the_pool():
    import itertools

    p = fastq.Pool(1)
    SEEN_PIDS.update(p.pids)
    it = p.imap(poolfns.double, itertools.count())  # endless, never iterated
    del it
    p.close()
    p.join(30)
    assert not p._driver.thread.is_alive()


def test_a_caller_that_gave_up_does_not_break_the_pool(pool):
    async def impatient():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.map_async(poolfns.spin, range(200_000)), 0.01)
        agen = pool.aimap_unordered(poolfns.spin, range(200_000))
        await agen.__anext__()
        await agen.aclose()

    asyncio.run(impatient())  # the loop is closed while results still come
    time.sleep(0.5)
    assert pool.map(poolfns.double, range(100)) == [2 * x for x in range(100)]


def test_a_poison_call_costs_innocent_calls_nothing():
    with fastq.Pool() as p:
        SEEN_PIDS.update(p.pids)
        futures = [p.submit(poolfns.exit_on_13, 13)] + [
            p.submit(poolfns.spin, i) for i in range(60)
        ]
        assert isinstance(futures[0].exception(timeout=120), fastq.WorkerLost)
        assert [f.result(timeout=120) for f in futures[1:]] == [2 * i for i in range(60)]
        SEEN_PIDS.update(pid for pid in p.pids if pid)
