"""How a call's results reach its caller: chunks ``(start, values, errors)`` from the driver
thread, put in order (``ordered``), as they come (``unordered``) or all at once (``gathered``),
on the caller's thread (``Results``) or event loop (``call_soon``)."""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastq.pool.job import DONE, Failure


class Results:
    """A job's replies for a caller's thread: (start, values, errors) chunks, then DONE."""

    def __init__(self, *, at_end: bool = False) -> None:
        self.chunks: collections.deque[Any] = collections.deque()
        self.ready = threading.Condition(threading.Lock())
        #: wake the caller only when the job ended (map): one thread switch per call, not per batch
        self.at_end = at_end

    def put(self, chunk: Any) -> None:
        if self.at_end and chunk is not DONE and not isinstance(chunk, Failure):
            self.chunks.append(chunk)  # deque.append is atomic; the caller reads after DONE
            return
        with self.ready:
            self.chunks.append(chunk)
            self.ready.notify()

    def get(self) -> Any:
        with self.ready:
            while not self.chunks:
                self.ready.wait()
            return self.chunks.popleft()

    def __iter__(self) -> Iterator[tuple[int, list[Any], list[tuple[int, BaseException]]]]:
        while True:
            chunk = self.get()
            if chunk is DONE:
                return
            if isinstance(chunk, Failure):
                raise chunk.error
            yield chunk


def unordered(
    chunks: Iterable[tuple[int, list[Any], list[tuple[int, BaseException]]]],
    cancel: Callable[[], None],
) -> Iterator[Any]:
    try:
        for _, values, errors in chunks:
            if errors:
                yield from values[: errors[0][0]]
                raise errors[0][1]
            yield from values
    finally:
        cancel()


def ordered(
    chunks: Iterable[tuple[int, list[Any], list[tuple[int, BaseException]]]],
    cancel: Callable[[], None],
) -> Iterator[Any]:
    held: dict[int, tuple[list[Any], list[tuple[int, BaseException]]]] = {}
    following = 0
    try:
        for start, values, errors in chunks:
            held[start] = (values, errors)
            while following in held:
                values, errors = held.pop(following)
                if errors:
                    yield from values[: errors[0][0]]
                    raise errors[0][1]
                yield from values
                following += len(values)
    finally:
        cancel()


def gathered(chunks: list[tuple[int, list[Any], list[tuple[int, BaseException]]]]) -> list[Any]:
    """All the values in order, or the exception of the first item that raised."""
    chunks.sort(key=lambda c: c[0])
    failed = [(start + errors[0][0], errors[0][1]) for start, _, errors in chunks if errors]
    if failed:
        raise min(failed, key=lambda f: f[0])[1]
    if len(chunks) == 1:
        return chunks[0][1]
    out: list[Any] = []
    for _, values, _ in chunks:
        out += values
    return out


def call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[Any], None], arg: Any) -> None:
    """Hand ``arg`` to the caller's event loop; a loop that has closed (the caller gave up and
    left asyncio.run) gets nothing, and the driver goes on."""
    try:
        loop.call_soon_threadsafe(fn, arg)
    except RuntimeError:
        pass
