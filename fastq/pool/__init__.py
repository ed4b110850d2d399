"""``fastq.Pool``: a process pool on the engine's worker runtime, for code that would use
``multiprocessing.Pool`` or ``ProcessPoolExecutor``.

The caller's process plays the supervisor (ARCHITECTURE.md): the pool's driver thread
(fastq.pool.driver) owns the fleet of pinned worker processes (fastq.engine.fleet, the same as
the engine's) and their rings; each call of ``map`` & co. is a job cut into batches
(fastq.pool.job). One worker process per usable core runs ``fastq.worker``'s ``Runtime`` with
``fastq.executors.pool.PoolExecutor``: a plain function inline, an ``async def`` on the worker's
uvloop with up to ``concurrency`` calls in flight. What happens when a worker dies is the
driver's docstring.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import operator
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, Literal, Self, TypeVar

import msgspec

from fastq.autosize import Topology, plan
from fastq.autosize.claims import CoreClaim
from fastq.config import Config, HandlerOptions
from fastq.errors import ConfigError
from fastq.pool.driver import Driver
from fastq.pool.job import ASYNC_CONCURRENCY, DONE, RING_BYTES, Failure, Job
from fastq.pool.results import Results, call_soon, gathered, ordered, unordered

__all__ = ["Pool", "PoolStatistics"]

T = TypeVar("T")
R = TypeVar("R")


class PoolStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """Totals since a pool started (``Pool.statistics()``)."""

    #: batches sent to workers
    batches: int
    #: items sent to workers (again after a worker died included)
    items_sent: int
    #: items whose replies came in
    items_done: int
    #: items sent again after their worker died
    items_again: int
    #: workers that died after they were ready; each was replaced
    workers_lost: int


class Pool:
    """A pool of worker processes, one per usable core, pinned, started once and reused.

    Parameters:
        processes: worker processes; by default one per usable core (affinity mask and cgroup
            quota, as ``fastq plan`` counts them).
        kind: how a plain (not ``async``) function runs in a worker: ``"cpu"`` or ``"auto"``
            inline, one call at a time per process; ``"io"`` in a thread pool of
            ``concurrency`` threads per process (blocking I/O). Coroutine functions always
            run on the worker's event loop.
        concurrency: calls in flight per process for ``async def`` functions (and for
            ``kind="io"``); default 100.
        ring_bytes: the size of each worker's two rings; one argument must fit in half.

    Calls may come from any thread. A function and its arguments reach the workers as
    msgpack when they are builtins or msgspec Structs, raw when they are bytes, pickled
    otherwise; a function must be importable by name in the workers (module level), as for
    ``multiprocessing``.
    """

    def __init__(
        self,
        processes: int | None = None,
        *,
        kind: Literal["auto", "io", "cpu"] = "auto",
        concurrency: int | None = None,
        ring_bytes: int = RING_BYTES,
        log_level: str = "WARNING",
    ) -> None:
        if kind not in ("auto", "io", "cpu"):
            raise ConfigError(f"kind must be 'auto', 'io' or 'cpu', got {kind!r}")
        if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
            raise ConfigError(
                f"concurrency must be a positive int (calls in flight per process), got "
                f"{concurrency!r}"
            )
        if ring_bytes < 64 << 10:
            raise ConfigError(f"ring_bytes must be at least 65536, got {ring_bytes}")
        if not isinstance(log_level, str) or log_level.upper() not in (
            "DEBUG",
            "INFO",
            "WARNING",
            "ERROR",
            "CRITICAL",
        ):
            raise ConfigError(
                f"log_level must be one of debug, info, warning, error, critical; got {log_level!r}"
            )
        #: processes, pinning and the rules behind them, as ``fastq plan`` explains them
        self.plan = plan(
            Topology.detect(),
            [HandlerOptions(queue="pool", kind=kind)],
            Config(processes=processes),
        )
        self.processes = self.plan.processes
        self.kind = kind
        self.concurrency = concurrency or ASYNC_CONCURRENCY
        cores = CoreClaim()
        cpus: tuple[int | None, ...] = (None,) * self.processes
        if self.plan.pinned:  # the cores other fastq processes of this host use least
            cpus = cores.take(self.processes, self.plan.topology.cpus)
        self._driver = Driver(cpus, self.concurrency, ring_bytes, log_level.upper(), cores)
        # leaving without close/terminate (or the interpreter exiting) leaks neither processes
        # nor shared memory
        self._finalizer = weakref.finalize(self, self._driver.stop, "terminate", 10)

    def _job(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        batch_size: int | str,
        deliver: Callable[[Any], None],
        star: bool = False,
    ) -> Job:
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise ConfigError(f"batch_size must be 'auto' or a positive int, got {batch_size!r}")
        job = Job(
            fn,
            items,
            star=star,
            batch_size=None if batch_size == "auto" else int(batch_size),
            concurrency=self.concurrency,
            deliver=deliver,
            length=operator.length_hint(items),
            processes=self.processes,
            threads=self.kind == "io",
        )
        self._driver.add(job)
        return job

    def map(
        self, fn: Callable[[T], R], iterable: Iterable[T], *, batch_size: int | str = "auto"
    ) -> list[R]:
        """``[fn(x) for x in iterable]``, over the workers.

        Raises:
            Exception: the first item's (in order) exception, as ``fn`` raised it, with the
                worker's traceback as ``__cause__``; later items are not started.
            WorkerLost: an item's worker died each time it ran (see the module's docstring).
        """
        results = Results(at_end=True)
        self._job(fn, iterable, batch_size, results.put)
        return gathered(list(results))

    def imap(
        self, fn: Callable[[T], R], iterable: Iterable[T], *, batch_size: int | str = "auto"
    ) -> Iterator[R]:
        """Like ``map``, yielding results in order as they come; an exception ends the iteration
        at its item. Leaving the loop early cancels what was not sent yet."""
        return self._iterate(fn, iterable, batch_size, ordered)

    def imap_unordered(
        self, fn: Callable[[T], R], iterable: Iterable[T], *, batch_size: int | str = "auto"
    ) -> Iterator[R]:
        """Like ``imap``, in the order the results come back."""
        return self._iterate(fn, iterable, batch_size, unordered)

    def _iterate(
        self,
        fn: Callable[..., Any],
        iterable: Iterable[Any],
        batch_size: int | str,
        order: Callable[[Any, Callable[[], None]], Iterator[Any]],
    ) -> Iterator[Any]:
        results = Results()
        # starts now, not at the first next()
        job = self._job(fn, iterable, batch_size, results.put)
        cancel = functools.partial(self._cancel, job)
        iterator = order(results, cancel)
        # dropped before its first next(), its finally never runs
        weakref.finalize(iterator, cancel)
        return iterator

    def _cancel(self, job: Job) -> None:
        """The caller left before the end: send no more, drop what comes back."""
        if not job.finished:
            job.cancelled = True
            self._driver.wake()

    def submit(
        self, fn: Callable[..., R], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[R]:
        """Run ``fn(*args, **kwargs)`` in a worker; the future gets its result or exception."""
        future: concurrent.futures.Future[R] = concurrent.futures.Future()

        def deliver(chunk: Any) -> None:  # on the driver thread
            if chunk is DONE or future.done():
                return
            try:
                if isinstance(chunk, Failure):
                    future.set_exception(chunk.error)
                elif chunk[2]:
                    future.set_exception(chunk[2][0][1])
                else:
                    future.set_result(chunk[1][0])
            except concurrent.futures.InvalidStateError:  # cancelled by the caller meanwhile
                pass

        job = self._job(fn, [(args, kwargs)], "auto", deliver, star=True)

        def cancelled(f: concurrent.futures.Future[R]) -> None:
            if f.cancelled():
                self._cancel(job)

        future.add_done_callback(cancelled)
        return future

    async def map_async(
        self,
        fn: Callable[[T], R] | Callable[[T], Awaitable[R]],
        iterable: Iterable[T],
        *,
        batch_size: int | str = "auto",
    ) -> list[R]:
        """``map`` for a caller inside an event loop: awaiting it never blocks the loop."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[R]] = loop.create_future()
        chunks: list[Any] = []

        def finish(chunk: Any) -> None:
            if done.done():
                return
            if isinstance(chunk, Failure):
                done.set_exception(chunk.error)
                return
            try:
                done.set_result(gathered(chunks))
            except BaseException as e:  # noqa: BLE001 - the first item's exception is the result
                done.set_exception(e)

        def deliver(chunk: Any) -> None:  # on the driver thread
            if chunk is DONE or isinstance(chunk, Failure):
                call_soon(loop, finish, chunk)
            else:
                chunks.append(chunk)

        job = self._job(fn, iterable, batch_size, deliver)
        try:
            return await done
        finally:
            self._cancel(job)  # when the caller was cancelled

    async def aimap_unordered(
        self,
        fn: Callable[[T], R] | Callable[[T], Awaitable[R]],
        iterable: Iterable[T],
        *,
        batch_size: int | str = "auto",
    ) -> AsyncIterator[R]:
        """``imap_unordered`` for a caller inside an event loop (an async iterator)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def deliver(chunk: Any) -> None:  # on the driver thread
            call_soon(loop, queue.put_nowait, chunk)

        job = self._job(fn, iterable, batch_size, deliver)
        try:
            while True:
                chunk = await queue.get()
                if chunk is DONE:
                    return
                if isinstance(chunk, Failure):
                    raise chunk.error
                for value in unordered([chunk], lambda: None):
                    yield value
        finally:
            self._cancel(job)

    @property
    def pids(self) -> list[int | None]:
        """The worker processes' pids now (None while one is being replaced)."""
        return [w.process.pid if w.process is not None else None for w in self._driver.fleet]

    def statistics(self) -> PoolStatistics:
        """Totals since the pool started (see ``PoolStatistics``)."""
        counts = self._driver.batches.counts
        return PoolStatistics(**{k: counts[k] for k in PoolStatistics.__struct_fields__})

    def close(self) -> None:
        """Take no more calls; the ones made still finish (``join`` waits for them)."""
        with self._driver.lock:
            if self._driver.stopping is None:
                self._driver.stopping = "join"
        self._driver.wake()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the calls made to finish and the workers to exit; ``close`` first.

        Raises:
            ValueError: the pool was not closed.
        """
        if self._driver.stopping is None:
            raise ValueError(
                "join() needs close() or terminate() first, as multiprocessing.Pool does"
            )
        self._driver.stop(self._driver.stopping, timeout)
        if not self._driver.thread.is_alive():
            self._finalizer.detach()

    def terminate(self) -> None:
        """Stop now: kill the workers, fail the calls not finished with ``PoolClosed``."""
        self._driver.stop("terminate")
        self._finalizer.detach()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        """Leaving normally waits for the calls made (``close`` + ``join``); leaving on an
        exception terminates."""
        if exc_type is None:
            self.close()
            self.join()
        else:
            self.terminate()
