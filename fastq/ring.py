"""The one importer of the ring implementation: the compiled fastq._core, or its twin on request.

``FASTQ_NO_EXTENSIONS=1`` selects the pure-Python reference (fastq/_core_py.py). Otherwise the
extension must import: a broken build raises here instead of falling back to the slow path.
"""

from __future__ import annotations

import asyncio
import os

from fastq.errors import PeerLost, RingEmpty

if os.environ.get("FASTQ_NO_EXTENSIONS"):
    from fastq._core_py import WAIT_SLICE_SECONDS, AckWindow, Dispatcher, DispatcherStatistics, Ring, RingStatistics

    IMPLEMENTATION = "python"
else:
    from fastq._core import (  # an ImportError here means a broken build
        AckWindow,
        Dispatcher,
        DispatcherStatistics,
        Ring,
        RingStatistics,
    )
    from fastq._core_py import WAIT_SLICE_SECONDS

    IMPLEMENTATION = "cython"

from fastq._core_py import COMPLETION, DELIVERY, STATUS_OK

__all__ = [
    "COMPLETION", "DELIVERY", "AckWindow", "IMPLEMENTATION", "STATUS_OK", "Dispatcher", "DispatcherStatistics", "Ring",
    "RingStatistics", "get_many_async",
]


async def get_many_async(
    ring: Ring, max_frames: int = 1024, *, timeout: float | None = None
) -> list[bytes]:
    """``ring.get_many`` for a coroutine: waits on ``ring.fileno()`` without blocking the loop.

    The producer writes to the wake-up descriptor only when this side asked for it
    (``request_wakeup``), so a busy ring costs no syscall per frame.

    Raises:
        RingEmpty: ``timeout`` seconds passed with no frame.
        RingClosed: the ring is closed and drained.
        PeerLost: the producer died while we waited.
    """
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    while True:
        try:
            return ring.get_many_nowait(max_frames)
        except RingEmpty:
            pass
        if not ring.request_wakeup():
            continue
        woken = loop.create_future()
        fd = ring.fileno()
        loop.add_reader(fd, _set_done, woken)
        wait = WAIT_SLICE_SECONDS if deadline is None else min(WAIT_SLICE_SECONDS, deadline - loop.time())
        try:
            await asyncio.wait_for(woken, max(wait, 0.0))
        except TimeoutError:
            pid = ring.statistics().producer_pid
            if pid and not ring.producer_alive():
                try:  # what it wrote before it went is still ours
                    return ring.get_many_nowait(max_frames)
                except RingEmpty:
                    raise PeerLost(f"the producer of ring {ring.name!r} (pid {pid}) is gone") from None
            if deadline is not None and loop.time() >= deadline:
                raise RingEmpty(f"ring {ring.name!r} stayed empty until the timeout") from None
        finally:
            loop.remove_reader(fd)
            ring.clear_wakeup()


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
