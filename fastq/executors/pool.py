"""Runs ``fastq.Pool`` batches in a worker: a plain function inline, item after item; an
``async def`` on the loop, up to ``concurrency`` items at once across all the batches this
worker holds; a plain function of ``kind="io"`` in threads. ``fn`` arrives as its pickle (a
reference to a module-level function, as ``multiprocessing`` sends it) and is loaded once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import pickle
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastq.codec import (
    STAR,
    THREADS,
    WHOLE_BATCH,
    ErrorRecord,
    decode_request,
    encode_reply,
    error_record,
)
from fastq.wire import Status

if TYPE_CHECKING:
    from fastq.worker import Runtime


class PoolExecutor:
    """Runs ``fastq.Pool`` batches in a worker (``WorkerSpec.executor``): a plain function
    inline, item after item; an ``async def`` on the loop, up to ``concurrency`` items at once
    across all the batches this worker holds."""

    #: each frame is a whole batch that its caller waits for: report it at once
    flush_each = True

    def __init__(self, runtime: Runtime) -> None:
        self.concurrency = max(1, runtime.spec.concurrency)
        #: a reply frame must fit the output ring with its completion header
        self.max_reply_bytes = runtime.outbox.max_frame_bytes - 64
        #: batches at once: enough for the caller's window of async batches to all be started
        self.slots = 2 * self.concurrency + 8
        self.fns: dict[bytes, tuple[Any, bool]] = {}
        self.limit: asyncio.Semaphore | None = None
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    def threads(self) -> concurrent.futures.ThreadPoolExecutor:
        if self.pool is None:
            self.pool = concurrent.futures.ThreadPoolExecutor(
                self.concurrency, thread_name_prefix="fastq-pool"
            )
        return self.pool

    def reports(self) -> list[bytes]:
        return []

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def load(self, fn_ref: bytes) -> tuple[Any, bool]:
        loaded = self.fns.get(fn_ref)
        if loaded is None:
            fn = pickle.loads(fn_ref)
            loaded = self.fns[fn_ref] = (fn, inspect.iscoroutinefunction(fn))
        return loaded

    async def run(
        self, body: memoryview, attempt: int, queue_index: int
    ) -> tuple[int, float, bytes]:
        """Run one batch; its reply, as a RESULT completion (the delay field is not used)."""
        started = time.perf_counter()
        values: list[Any] = []
        errors: list[ErrorRecord] = []
        try:
            flags, fn_ref, items = decode_request(body)
            fn, is_async = self.load(fn_ref)
        except Exception as e:  # noqa: BLE001 - fn not importable here, a codec of another version...
            errors.append(error_record(WHOLE_BATCH, e))
        else:
            if is_async or flags & THREADS:
                values = await self.run_async(
                    fn, items, flags & STAR, errors, threaded=not is_async
                )
            else:
                values = run_sync(fn, items, flags & STAR, errors)
        payload = encode_reply(time.perf_counter() - started, values, errors, self.max_reply_bytes)
        return Status.RESULT, 0.0, payload

    async def run_async(
        self, fn: Any, items: list[Any], star: int, errors: list[ErrorRecord], threaded: bool
    ) -> list[Any]:
        if self.limit is None:
            self.limit = asyncio.Semaphore(self.concurrency)
        limit = self.limit
        values: list[Any] = [None] * len(items)
        loop = asyncio.get_running_loop()

        async def one(i: int, x: Any) -> None:
            async with limit:
                try:
                    if threaded:
                        call = (
                            functools.partial(fn, *x[0], **x[1])
                            if star
                            else functools.partial(fn, x)
                        )
                        ok, value = await loop.run_in_executor(self.threads(), _guarded, call)
                        if not ok:
                            raise value
                        values[i] = value
                    else:
                        values[i] = await (fn(*x[0], **x[1]) if star else fn(x))
                except BaseException as e:
                    task = asyncio.current_task()
                    if (
                        isinstance(e, asyncio.CancelledError)
                        and task is not None
                        and task.cancelling()
                    ):
                        raise  # the worker itself is being stopped
                    errors.append(error_record(i, e))

        await asyncio.gather(*[one(i, x) for i, x in enumerate(items)])
        return values


def _guarded(call: Callable[[], Any]) -> tuple[bool, Any]:
    """Run ``call`` in a thread, its exception returned as a value: an asyncio future cannot
    carry StopIteration, and a BaseException would escape the executor's bookkeeping."""
    try:
        return True, call()
    except BaseException as e:  # noqa: BLE001 - handed to the item
        return False, e


def run_sync(fn: Any, items: list[Any], star: int, errors: list[ErrorRecord]) -> list[Any]:
    """``fn`` over ``items`` in order; an item that raises gets None and an error record, and
    the loop goes on with the next (each item runs exactly once)."""
    values: list[Any] = []
    it = iter(items)
    while True:
        try:
            if star:
                for args, kwargs in it:
                    values.append(fn(*args, **kwargs))
            else:
                # list.extend keeps what map gave before an exception, and map has taken the item
                # that raised from ``it``: the loop goes on after it
                values.extend(map(fn, it))
                if len(values) < len(items):  # fn raised StopIteration, which ends map quietly
                    errors.append(
                        error_record(len(values), StopIteration("fn raised StopIteration"))
                    )
                    values.append(None)
                    continue
            return values
        except BaseException as e:  # noqa: BLE001 - whatever fn raised is the item's outcome
            errors.append(error_record(len(values), e))
            values.append(None)
