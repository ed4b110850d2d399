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
import contextvars
import logging
import random
import time
import traceback
from typing import TYPE_CHECKING, Any

from fastq import _load, logs, message, results, tally, wire
from fastq.config import HandlerOptions, Route
from fastq.errors import RingClosed, RingFull
from fastq.middleware import Hooks, Processing
from fastq.wire import Status
from fastq.workflow import relay

if TYPE_CHECKING:
    from fastq.task import Consumer, Task
    from fastq.worker import Runtime

logger = logging.getLogger(__name__)

#: an "auto" sync handler is measured over this many calls before it is classified
AUTO_SAMPLES = 8
#: below this share of on-CPU time, an "auto" sync handler counts as I/O-bound
AUTO_IO_BELOW = 0.5
#: a reason is cut to this many characters
REASON_CHARS = 2000
#: a kept failure's traceback is cut to its last this many characters
TRACEBACK_CHARS = 20000


def _keep(headers: dict[str, str] | None) -> float:
    """Seconds to keep a result that its message asks for (``task.call``); 0: none."""
    if not headers or results.KEEP not in headers:
        return 0.0
    try:
        return max(0.0, float(headers[results.KEEP]))
    except ValueError:
        return 0.0


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
        middleware = list(self.app.middleware)
        #: what this worker counts for the supervisor's /metrics (None: not asked to)
        self.tally: tally.Tally | None = None
        if spec.metrics:
            self.tally = tally.new()
            middleware.insert(0, self.tally)  # outermost: it times the others' hooks too
        self.hooks = Hooks(middleware)
        #: JSON log lines name the message their handler runs for (logs.current)
        self.log_context = logs.root_format() == "json"

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        # runs its handlers started on RabbitMQ: their first steps go out before the worker
        # leaves (else they wait in the result store's outbox for a supervisor's sweep)
        relay.flush_all(relay.EXIT_WAIT)

    async def run(
        self, body: memoryview, retries: int, queue_index: int
    ) -> tuple[int, float, bytes]:
        """Run one delivery: its status, retry delay and payload (the reason in UTF-8, cut to
        REASON_CHARS; a ``wire.Returned`` for VALUE and FAILED)."""
        status, delay, payload = await self.outcome(body, retries, queue_index)
        if isinstance(payload, str):
            return status, delay, payload[:REASON_CHARS].encode("utf-8", "backslashreplace")
        return status, delay, payload

    async def outcome(
        self, body: memoryview, retries: int, queue_index: int
    ) -> tuple[int, float, str | bytes]:
        consumer = self.consumers[queue_index]
        queue = self.runtime.spec.queues[queue_index]
        headers: dict[str, str] | None = None
        enqueued_at = 0.0
        if consumer is not None:
            if retries & wire.WITH_HEADERS:  # the broker message's own (a foreign producer's)
                retries &= wire.RETRIES_MASK
                headers, body = wire.split_headers(body)
            handler: Task | Consumer = consumer
            args: tuple[Any, ...] = (bytes(body),)
            name, message_id = consumer.name, ""
        else:
            try:
                envelope = message.decode(body)
            except Exception as e:  # noqa: BLE001 - whatever the bytes do, they are not a message
                return await self.rejected(Processing("", "", queue, retries), f"undecodable: {e}")
            headers, enqueued_at = envelope.headers, envelope.enqueued_at
            task = self.app.tasks.get(envelope.task)
            if task is None:
                reason = (
                    f"unknown task {envelope.task!r}: this app registers "
                    f"{sorted(self.app.tasks)[:5]}; deploy the task or fix the producer"
                )
                seen = Processing(envelope.task, envelope.id, queue, retries, headers, enqueued_at)
                await self.rejected(seen, reason)
                return self.failed_for_good(envelope.task, reason, None, _keep(headers), headers)
            handler = task
            try:
                args = task.decode_args(envelope.args)
            except Exception as e:  # noqa: BLE001 - ValidationError, bad UTF-8, nesting too deep...
                reason = f"invalid arguments for {envelope.task}: {e}"
                seen = Processing(envelope.task, envelope.id, queue, retries, headers, enqueued_at)
                await self.rejected(seen, reason)
                keep = task.options.result_ttl or _keep(headers)
                return self.failed_for_good(envelope.task, reason, e, keep, headers)
            name, message_id = envelope.task, envelope.id
        if self.log_context:  # this message's own task: its context ends with it
            logs.current.set((queue, name, message_id))
        options: HandlerOptions = handler.options
        keep = options.result_ttl or _keep(headers)
        processing = Processing(name, message_id, queue, retries, headers, enqueued_at)
        hooks = self.hooks
        exc: BaseException | None = None
        payload = b""
        try:
            if hooks.before_sync is not None:
                for sync in hooks.before_sync:
                    sync(processing)
            else:
                for hook, is_async in hooks.before:
                    if is_async:
                        await hook(processing)
                    else:
                        hook(processing)
            processing.result = value = await self.call(handler, args, name, options)
            if keep or handler.publish_to is not None:
                payload = self.returned(handler, value, keep, headers)
        except Exception as e:  # noqa: BLE001 - any failure of user code is the message's outcome
            exc = e
        except asyncio.CancelledError as e:  # one the handler let out of something it awaited,
            current = asyncio.current_task()  # unless this handler's own task is being cancelled
            if current is not None and current.cancelling():
                raise
            exc = e
        retry = retries < options.max_retries
        if hooks.after:
            processing.outcome = "ok" if exc is None else "retried" if retry else "dead"
            for hook, is_async in hooks.after:
                try:
                    if is_async:
                        await hook(processing, exc)
                    else:
                        hook(processing, exc)
                except Exception as e:  # noqa: BLE001 - a hook's failure is the message's
                    if exc is None:
                        exc = e
                        processing.outcome = "retried" if retry else "dead"
        if exc is None:
            return (Status.VALUE, 0.0, payload) if payload else (Status.OK, 0.0, "")
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, TimeoutError):
            reason = f"timed out after {options.timeout} s ({reason})"
        if retry:
            delay = options.retry_backoff * (2**retries) * random.uniform(0.5, 1.5)
            return Status.RETRY, delay, reason
        reason = f"{reason} (after {retries + 1} attempts)"
        return self.failed_for_good(name, reason, exc, keep, headers)

    async def rejected(self, seen: Processing, reason: str) -> tuple[int, float, str]:
        """A message that never reached a handler: the ``after_reject`` hooks see it; DEAD."""
        seen.outcome = "dead"
        for hook, is_async in self.hooks.reject:
            try:
                if is_async:
                    await hook(seen, reason)
                else:
                    hook(seen, reason)
            except Exception:  # it is dead already; the hook's bug is logged
                logger.exception("after_reject of %s failed", seen.handler or "a message")
        return Status.DEAD, 0.0, reason

    def reports(self) -> list[bytes]:
        """What this worker counted since its last report, as report frames for the supervisor
        (sent with the completions they count, in the same batch)."""
        frame = tally.report(self.tally) if self.tally is not None else None
        return [] if frame is None else [frame]

    def returned(
        self, handler: Task | Consumer, value: Any, keep: float, headers: dict[str, str] | None
    ) -> bytes:
        """The VALUE payload of what ``handler`` returned: the outcome to keep and the messages
        to publish (empty: there is neither).

        Raises:
            MessageError: the value does not encode, or is too large (the message's failure).
        """
        limit = self.runtime.spec.max_message_bytes
        encoded = handler.encode_value(value, limit) if keep else None
        route = handler.publish_to
        to = (
            (route.exchange, route.exchange_kind, route.routing_key, route.headers)
            if isinstance(route, Route)
            else ()
        )
        outputs = tuple(wire.Produced(*o, *to) for o in handler.outputs(value, limit, encoded))
        outcome = results.success(encoded) if encoded is not None else b""
        if not outcome and not outputs:
            return b""
        notify = (headers or {}).get(results.NOTIFY, "") if keep else ""
        return wire.encode_returned(wire.Returned(handler.name, keep, outcome, "", outputs, notify))

    def failed_for_good(
        self,
        name: str,
        reason: str,
        exc: BaseException | None,
        keep: float,
        headers: dict[str, str] | None,
    ) -> tuple[int, float, str | bytes]:
        """DEAD with ``reason``; FAILED with the failure to keep, where a result is kept."""
        if not keep:
            return Status.DEAD, 0.0, reason
        reason = reason[:REASON_CHARS]
        tb = "".join(traceback.format_exception(exc))[-TRACEBACK_CHARS:] if exc else ""
        outcome = results.failure(
            type(exc).__name__ if exc else "", str(exc) if exc else "", tb, reason
        )
        notify = (headers or {}).get(results.NOTIFY, "")
        return (
            Status.FAILED,
            0.0,
            wire.encode_returned(wire.Returned(name, keep, outcome, reason, (), notify)),
        )

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
    ) -> Any:
        """Run the handler as its kind says; its return value."""
        if handler.is_async:
            if options.timeout is None:
                return await handler.fn(*args)
            return await asyncio.wait_for(handler.fn(*args), options.timeout)
        kind = options.kind
        if kind == "auto":
            shares = self.measured.setdefault(name, [])
            if len(shares) >= AUTO_SAMPLES:
                kind = "io" if sum(shares) / len(shares) < AUTO_IO_BELOW else "cpu"
            else:
                wall, cpu = time.perf_counter(), time.thread_time()
                try:
                    return handler.fn(*args)
                finally:
                    shares.append(
                        (time.thread_time() - cpu) / max(time.perf_counter() - wall, 1e-9)
                    )
                    if len(shares) == AUTO_SAMPLES:  # measured: the supervisor plans by it too
                        self.report(options.queue, sum(shares) / len(shares))
        if kind == "cpu":
            return handler.fn(*args)  # inline: this process owns its core
        # the thread runs in this task's context: what the handler sends keeps its trace
        ctx = contextvars.copy_context()
        fut = self.runtime.loop.run_in_executor(self.pool, lambda: ctx.run(handler.fn, *args))
        return await asyncio.wait_for(fut, options.timeout)
