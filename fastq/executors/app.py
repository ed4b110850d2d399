"""Runs an app's tasks and consumers in a worker: the engine's deliveries, one message a frame.

The worker decides what became of each message, because it is the one that saw the exception:
``OK``, ``RETRY`` after a delay (exponential backoff with jitter, while retries < max_retries) or
``DEAD`` with the reason in words. A body that is not an envelope, names no task of the app, or
whose arguments do not validate is dead at once.

Handlers: ``async def`` runs on the loop, up to the worker's slots at once; a plain function of
kind ``cpu`` runs inline; of kind ``io`` in a thread pool; of kind ``auto`` inline while it is
measured, then in the pool if it spends most of its time off the CPU (and the supervisor is told,
so that it plans the queue by it too).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import time
from typing import TYPE_CHECKING, Any

from fastq import _load, message, wire
from fastq.config import HandlerOptions
from fastq.errors import RingClosed, RingFull
from fastq.middleware import Processing
from fastq.wire import Status

if TYPE_CHECKING:
    from fastq.worker import Runtime

logger = logging.getLogger(__name__)

#: an "auto" sync handler is measured over this many calls before it is classified
AUTO_SAMPLES = 8
#: below this share of on-CPU time, an "auto" sync handler counts as I/O-bound
AUTO_IO_BELOW = 0.5
#: a reason is cut to this many characters
REASON_CHARS = 2000


class AppExecutor:
    """Runs an app's tasks and consumers: the engine's deliveries, one message per frame."""

    #: completions may gather (Runtime.schedule_flush): the supervisor refills from its backlog
    flush_each = False

    def __init__(self, runtime: Runtime) -> None:
        spec = runtime.spec
        self.runtime, self.app = runtime, _load.load(spec.app)
        self.slots = spec.concurrency
        # Threads start only when used: room for every slot autosize may give (plain-function
        # I/O handlers must not wait for a thread, their timeout counts from the call).
        self.pool = concurrent.futures.ThreadPoolExecutor(max(4, spec.concurrency, spec.io_threads))
        self.measured: dict[str, list[float]] = {}  # handler -> on-CPU shares of its calls
        self.consumers = [self.app.consumers.get(q) for q in spec.queues]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def run(
        self, body: memoryview, retries: int, queue_index: int
    ) -> tuple[int, float, bytes]:
        """Run one delivery: its status, retry delay and reason (UTF-8, cut to REASON_CHARS)."""
        status, delay, reason = await self.outcome(body, retries, queue_index)
        return status, delay, reason[:REASON_CHARS].encode("utf-8", "backslashreplace")

    async def outcome(
        self, body: memoryview, retries: int, queue_index: int
    ) -> tuple[int, float, str]:
        consumer = self.consumers[queue_index]
        if consumer is not None:
            handler, args, name, message_id = consumer, (bytes(body),), consumer.name, ""
        else:
            try:
                envelope = message.decode(body)
            except Exception as e:  # noqa: BLE001 - whatever the bytes do, they are not a message
                return Status.DEAD, 0.0, f"undecodable: {e}"
            handler = self.app.tasks.get(envelope.task)
            if handler is None:
                return (
                    Status.DEAD,
                    0.0,
                    (
                        f"unknown task {envelope.task!r}: this app registers "
                        f"{sorted(self.app.tasks)[:5]}; deploy the task or fix the "
                        "producer"
                    ),
                )
            try:
                args = handler.decode_args(envelope.args)
            except Exception as e:  # noqa: BLE001 - ValidationError, bad UTF-8, nesting too deep...
                return Status.DEAD, 0.0, f"invalid arguments for {envelope.task}: {e}"
            name, message_id = envelope.task, envelope.id
        options: HandlerOptions = handler.options
        processing = Processing(name, message_id, self.runtime.spec.queues[queue_index], retries)
        exc: BaseException | None = None
        try:
            for mw in self.app.middleware:
                mw.before_process(processing)
            await self.call(handler, args, name, options)
        except Exception as e:  # noqa: BLE001 - any failure of user code is the message's outcome
            exc = e
        except asyncio.CancelledError as e:  # one the handler let out of something it awaited,
            task = asyncio.current_task()  # unless this handler's own task is being cancelled
            if task is not None and task.cancelling():
                raise
            exc = e
        for mw in reversed(self.app.middleware):
            try:
                mw.after_process(processing, exc)
            except Exception as e:  # noqa: BLE001
                exc = exc or e
        if exc is None:
            return Status.OK, 0.0, ""
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, TimeoutError):
            reason = f"timed out after {options.timeout} s ({reason})"
        if retries < options.max_retries:
            delay = options.retry_backoff * (2**retries) * random.uniform(0.5, 1.5)
            return Status.RETRY, delay, reason
        return Status.DEAD, 0.0, f"{reason} (after {retries + 1} attempts)"

    def report(self, queue: str, share: float) -> None:
        """Tell the supervisor what an "auto" handler measured; a report that cannot go (a full
        or closed ring) is logged and dropped: it never changes the message's own outcome."""
        kind = "io" if share < AUTO_IO_BELOW else "cpu"
        try:
            self.runtime.say(wire.classified_report(queue, kind, round(share, 3)))
        except (RingFull, RingClosed) as e:
            logger.warning(
                "worker %d: could not report queue %r as %s-bound (%s)",
                self.runtime.spec.index,
                queue,
                kind,
                type(e).__name__,
            )

    async def call(
        self, handler: Any, args: tuple[Any, ...], name: str, options: HandlerOptions
    ) -> None:
        if handler.is_async:
            if options.timeout is None:
                await handler.fn(*args)
            else:
                await asyncio.wait_for(handler.fn(*args), options.timeout)
            return
        kind = options.kind
        if kind == "auto":
            shares = self.measured.setdefault(name, [])
            if len(shares) >= AUTO_SAMPLES:
                kind = "io" if sum(shares) / len(shares) < AUTO_IO_BELOW else "cpu"
            else:
                wall, cpu = time.perf_counter(), time.thread_time()
                try:
                    handler.fn(*args)
                finally:
                    shares.append(
                        (time.thread_time() - cpu) / max(time.perf_counter() - wall, 1e-9)
                    )
                    if len(shares) == AUTO_SAMPLES:  # measured: the supervisor plans by it too
                        self.report(options.queue, sum(shares) / len(shares))
                return
        if kind == "cpu":
            handler.fn(*args)  # inline: this process owns its core
            return
        fut = self.runtime.loop.run_in_executor(self.pool, lambda: handler.fn(*args))
        await asyncio.wait_for(fut, options.timeout)
