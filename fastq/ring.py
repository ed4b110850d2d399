"""The one importer of the ring implementation: the compiled fastq._core, or its twin on request.

``FASTQ_NO_EXTENSIONS=1`` selects the pure-Python reference (fastq/_core_py.py). Otherwise the
extension must import: a broken build raises here instead of falling back to the slow path.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from fastq.errors import PeerLost, RingClosed, RingEmpty

if TYPE_CHECKING:  # the stub of fastq._core is the contract of both implementations
    from fastq._core import (
        AckWindow,
        Dispatcher,
        DispatcherStatistics,
        Ring,
        RingStatistics,
        plain_values,
    )

    IMPLEMENTATION: str
elif os.environ.get("FASTQ_NO_EXTENSIONS"):
    from fastq._core_py import (
        AckWindow,
        Dispatcher,
        DispatcherStatistics,
        Ring,
        RingStatistics,
        plain_values,
    )

    IMPLEMENTATION = "python"
else:
    from fastq._core import (  # an ImportError here means a broken build
        AckWindow,
        Dispatcher,
        DispatcherStatistics,
        Ring,
        RingStatistics,
        plain_values,
    )

    IMPLEMENTATION = "cython"

from fastq._layout import COMPLETION, DELIVERY, STATUS_OK, WAIT_SLICE_SECONDS
from fastq._segment import sweep as sweep_dead_segments

__all__ = [
    "COMPLETION",
    "DELIVERY",
    "IMPLEMENTATION",
    "STATUS_OK",
    "AckWindow",
    "Dispatcher",
    "DispatcherStatistics",
    "Ring",
    "RingReader",
    "RingStatistics",
    "get_many_async",
    "plain_values",
    "sweep_dead_segments",
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
        wait = (
            WAIT_SLICE_SECONDS
            if deadline is None
            else min(WAIT_SLICE_SECONDS, deadline - loop.time())
        )
        try:
            await asyncio.wait_for(woken, max(wait, 0.0))
        except TimeoutError:
            pid = ring.statistics().producer_pid
            if pid and not ring.producer_alive():
                try:  # what it wrote before it went is still ours
                    return ring.get_many_nowait(max_frames)
                except RingEmpty:
                    raise PeerLost(
                        f"the producer of ring {ring.name!r} (pid {pid}) is gone"
                    ) from None
            if deadline is not None and loop.time() >= deadline:
                raise RingEmpty(f"ring {ring.name!r} stayed empty until the timeout") from None
        finally:
            loop.remove_reader(fd)
            ring.clear_wakeup()


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class RingReader:
    """Hands every batch that arrives in ``ring`` to ``on_frames``, on the running loop.

    One reader callback stays registered on the ring's wake-up descriptor for as long as the
    reader runs, so a batch costs no future, task or timer; the producer writes the descriptor
    only when this side said it was about to wait (it is "armed"). An owner that will look again
    soon anyway (a worker whose handler slots are all busy looks when one frees) passes
    ``arm_when``: while it returns False the reader does not arm, the producer's puts cost no
    syscall, and the owner calls ``drain()`` itself. It does not watch the producer's life: the
    caller does (the supervisor has each worker's process sentinel).
    """

    def __init__(
        self,
        ring: Ring,
        on_frames: Callable[[list[bytes]], object],
        max_frames: int = 1024,
        *,
        on_closed: Callable[[], object] | None = None,
        arm_when: Callable[[], bool] | None = None,
        on_error: Callable[[BaseException], object] | None = None,
    ) -> None:
        self.ring, self.on_frames, self.max_frames = ring, on_frames, max_frames
        self.on_closed, self.arm_when, self.on_error = on_closed, arm_when, on_error
        #: the producer will write the wake-up descriptor at its next put
        self.armed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd = -1

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = self.ring.fileno()
        self._loop.add_reader(self._fd, self._readable)
        self._loop.call_soon(self.drain)  # frames that came before we listened

    def stop(self) -> None:
        if self._loop is not None and self._fd >= 0:
            self._loop.remove_reader(self._fd)
        self._fd = -1

    def _readable(self) -> None:
        # The descriptor is level-triggered: take its wake-up even when not armed (a wake-up
        # sent as a request was withdrawn), or the loop would call us again at once, forever.
        if self._fd >= 0:
            self.ring.clear_wakeup()
            self.armed = False
        self.drain()

    def drain(self) -> bool:
        """Read and hand on every frame there is now; False once the ring is closed and drained
        (the reader stops itself then). An error in ``on_frames`` stops the reader and goes to
        ``on_error`` (raised when there is none): a stream that stopped must not look alive."""
        try:
            return self._drain()
        except Exception as e:
            self.stop()
            if self.on_error is None:
                raise
            self.on_error(e)
            return False

    def _drain(self) -> bool:
        ring = self.ring
        if self._fd < 0:
            return False
        if self.armed:
            ring.clear_wakeup()
            self.armed = False
        while True:
            try:
                frames = ring.get_many_nowait(self.max_frames)
            except RingEmpty:
                if self.arm_when is not None and not self.arm_when():
                    return True  # the owner looks again without being woken
                if ring.request_wakeup():
                    self.armed = True  # the producer will write the descriptor with the next frame
                    return True
                continue
            except RingClosed:
                self.stop()
                if self.on_closed is not None:
                    self.on_closed()
                return False
            self.on_frames(frames)
            if self._fd < 0:  # on_frames stopped us
                return True
