"""The asyncio pieces every event loop of fastq shares, and the one importer of uvloop.

``Signal`` is an ``asyncio.Event`` for the hot path, ``wait_either`` waits on two of them with a
timeout, and ``run_loop`` runs a coroutine on uvloop (the supervisor's, each worker's and the
benchmarks' loops).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class Signal:
    """``asyncio.Event`` that looks its loop up once, at its first wait: Python 3.11's Event
    does at every ``wait``, and that lookup is a getpid() system call; a supervisor waits once
    per message."""

    __slots__ = ("_loop", "_set", "_waiters")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if not self._set:
            self._set = True
            waiters, self._waiters = self._waiters, []
            for w in waiters:
                if not w.done():
                    w.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            self._forget(waiter)

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)


async def wait_either(
    event: asyncio.Event | Signal, wake: asyncio.Event | Signal | None, timeout: float
) -> None:
    """Wait until ``event`` or ``wake`` is set, or ``timeout`` seconds pass.

    Between ``Signal``s (the supervisor's pumps, once per fetch) it costs one future registered
    with both and one timer handle: no task, no ``asyncio.wait``."""
    if wake is not None and wake.is_set():
        return
    if event.is_set():
        # yield once all the same: a caller that loops on an event that stays set (a pump
        # whose consumer is being made again, "connected" set) must let the loop run
        await asyncio.sleep(0)
        return
    if isinstance(event, Signal) and (wake is None or isinstance(wake, Signal)):
        loop = event._loop
        if loop is None:
            loop = event._loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        event._waiters.append(waiter)
        if wake is not None:
            wake._waiters.append(waiter)
        timer = loop.call_later(timeout, _wake_up, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            event._forget(waiter)
            if wake is not None:
                wake._forget(waiter)
        return
    if wake is None:
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            pass
        return
    waits = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def _wake_up(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on a uvloop event loop (this module is the one uvloop importer)."""
    import uvloop

    return uvloop.run(main)
