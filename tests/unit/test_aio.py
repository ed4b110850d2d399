"""fastq._aio: Signal and wait_either, the supervisor's per-fetch wait."""

from __future__ import annotations

import asyncio

from fastq._aio import Signal, wait_either


def test_wait_either_ends_when_either_signal_is_set_and_leaves_no_waiter_behind():
    async def run() -> list[str]:
        event, wake = Signal(), Signal()
        seen = []
        for which in (event, wake):
            loop = asyncio.get_running_loop()
            loop.call_soon(which.set)
            await wait_either(event, wake, 60.0)
            seen.append("event" if event.is_set() else "wake")
            assert event._waiters == [] and wake._waiters == []
            event.clear()
            wake.clear()
        return seen

    assert asyncio.run(run()) == ["event", "wake"]


def test_wait_either_between_signals_makes_no_task():
    async def run() -> int:
        event, wake = Signal(), Signal()
        before = len(asyncio.all_tasks())
        asyncio.get_running_loop().call_soon(wake.set)
        waiting = wait_either(event, wake, 60.0)
        made = []
        loop = asyncio.get_running_loop()
        loop.call_soon(lambda: made.append(len(asyncio.all_tasks()) - before))
        await waiting
        return made[0]

    assert asyncio.run(run()) == 0


def test_wait_either_returns_after_its_timeout_with_nothing_set():
    async def run() -> tuple[bool, bool, int, int]:
        event, wake = Signal(), Signal()
        await wait_either(event, wake, 0.01)
        return event.is_set(), wake.is_set(), len(event._waiters), len(wake._waiters)

    assert asyncio.run(run()) == (False, False, 0, 0)


def test_wait_either_cancelled_forgets_its_waiter():
    async def run() -> tuple[int, int]:
        event, wake = Signal(), Signal()
        t = asyncio.ensure_future(wait_either(event, wake, 60.0))
        await asyncio.sleep(0)
        t.cancel()
        try:
            await t
        except asyncio.CancelledError:
            pass
        return len(event._waiters), len(wake._waiters)

    assert asyncio.run(run()) == (0, 0)


def test_wait_either_waits_on_asyncio_events_and_without_a_wake():
    async def run() -> list[bool]:
        got = []
        event = asyncio.Event()
        asyncio.get_running_loop().call_soon(event.set)
        await wait_either(event, asyncio.Event(), 60.0)
        got.append(event.is_set())
        lone = Signal()
        asyncio.get_running_loop().call_soon(lone.set)
        await wait_either(lone, None, 60.0)
        got.append(lone.is_set())
        return got

    assert asyncio.run(run()) == [True, True]


def test_wait_either_on_an_event_that_stays_set_lets_the_loop_run():
    async def run() -> int:
        event = asyncio.Event()
        event.set()
        ran = []
        asyncio.get_running_loop().call_soon(ran.append, 1)
        for _ in range(3):  # a caller looping on it, as a pump does while it reconnects
            await wait_either(event, Signal(), 60.0)
            if ran:
                break
        return len(ran)

    assert asyncio.run(run()) == 1
