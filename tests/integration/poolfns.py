"""Functions the pool tests send to workers: module level, so that workers import them by name
(and light, so that a worker does not import pytest to load them)."""

from __future__ import annotations

import asyncio
import os
import time

import msgspec

_in_flight = 0
_peak = 0


class Point(msgspec.Struct):
    x: int
    tags: tuple[str, ...] = ()


def identity(x):
    return x


def describe(x):
    """What the worker received, exactly: its type and repr (a set's in sorted order, which
    does not depend on how the set was built)."""
    return f"{type(x).__name__}:{sorted(x) if isinstance(x, (set, frozenset)) else x!r}"


def double(x):
    return x * 2


def shift(p: Point) -> Point:
    return Point(p.x + 1, (*p.tags, "seen"))


def spin(x):
    """About 20 us of pure Python, then x * 2."""
    t = time.perf_counter() + 20e-6
    while time.perf_counter() < t:
        pass
    return x * 2


def fail_on_7(x):
    if x == 7:
        raise ValueError(f"seven is not allowed (got {x})")
    return x


def stop_iteration_on_3(x):
    if x == 3:
        raise StopIteration("no more")
    return x


def exit_on_13(x):
    """Ends its worker process on 13: a poison item."""
    if x == 13:
        os._exit(3)
    return x


def pid(_):
    return os.getpid()


def add(a, b, *, scale=1):
    return (a + b) * scale


def unpicklable_result(_):
    return lambda: None


class Unpicklable(Exception):
    """Pickles, but cannot be rebuilt: its __init__ takes two arguments."""

    def __init__(self, a, b):
        super().__init__(a)
        self.b = b


def raise_unpicklable(_):
    raise Unpicklable("odd", 2)


def blocking_sleep(seconds):
    time.sleep(seconds)
    return os.getpid()


async def async_double(x):
    await asyncio.sleep(0)
    return x * 2


async def async_fail_on_7(x):
    await asyncio.sleep(0)
    if x == 7:
        raise KeyError(x)
    return x


async def nap_peak(seconds):
    """Sleep; return (pid, the most naps this process had in flight at once so far)."""
    global _in_flight, _peak
    _in_flight += 1
    _peak = max(_peak, _in_flight)
    try:
        await asyncio.sleep(seconds)
    finally:
        _in_flight -= 1
    return os.getpid(), _peak


def kilobyte(x):
    return "k" * 1000


def megabytes(_):
    return b"m" * (3 << 20)


class Halt(BaseException):
    """Not an Exception: escapes `except Exception`."""


def raise_base(_):
    raise Halt("stop right there")


def stop_iteration(_):
    raise StopIteration("from a thread")


def unrebuildable(_):
    return Unpicklable("odd", 2)


class Loose(msgspec.Struct):
    x: int
    anything: object = None


def surrogate_error(_):
    raise ValueError("bad \ud800 text")


async def async_fail_1_slowly_and_3(x):
    if x == 1:
        await asyncio.sleep(0.2)
        raise ValueError(1)
    if x == 3:
        raise ValueError(3)
    return x


def bad_iterable():
    yield 1
    yield 2
    raise ZeroDivisionError("the caller's generator failed")
