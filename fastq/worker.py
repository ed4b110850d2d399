"""A worker process: pinned to one core, one uvloop loop, frames in from one ring, completions out.

Workers never touch the broker. The supervisor frames each delivery as ``[tag | retries | queue
index | body]``; the worker decodes it, runs its handler, and decides what became of it, because
it is the one that saw the exception: ``ok``, ``retry`` after a delay (exponential backoff with
jitter, while retries < max_retries) or ``dead`` with the reason in words. A body that is not an
envelope, names no task of the app, or whose arguments do not validate is dead at once.

Handlers: ``async def`` runs on the loop, up to ``concurrency`` at once; a plain function of kind
``cpu`` runs inline; of kind ``io`` in a thread pool; of kind ``auto`` inline while it is measured,
then in the pool if it spends most of its time off the CPU.

One runtime, two front doors (ARCHITECTURE.md): ``Runtime`` owns the rings, the handler slots and
the completion flushes; what a frame means is its executor's business. ``AppExecutor`` runs an
app's tasks and consumers (the engine); ``fastq._call.PoolExecutor`` runs ``fastq.Pool`` batches,
named by ``WorkerSpec.executor`` so that this module does not import the pool's.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import random
import signal
import struct
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import msgspec

from fastq import _load, message
from fastq._aio import run_loop
from fastq.autosize import IO_CONCURRENCY_MAX
from fastq.errors import RingClosed, RingFull
from fastq.ring import COMPLETION, DELIVERY, STATUS_OK, Ring, RingReader

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Frames: DELIVERY (supervisor -> worker: tag, retries so far, queue index; the body follows) and
# COMPLETION (worker -> supervisor: tag, outcome, retry delay in seconds; a utf-8 reason follows).
OK, RETRY, DEAD = STATUS_OK, 1, 2
#: the first completion a worker writes, with tag 0: its rings are attached and its app loaded
READY = 3
#: a worker past max_tasks or max_memory asks to leave (tag 0); it goes when a delivery of tag 0 comes
RETIRE = 4
#: a worker measured an "auto" handler (tag 0; the reason is JSON: queue, kind, on-CPU share)
CLASSIFIED = 6
#: a delivery of tag 0 to this queue index sets the worker's handler slots to its ``retries``
#: field (the autosize controller moved the concurrency); the body, if any, is each queue's
#: slots (little-endian uint32 per queue index)
CONTROL_QUEUE = 0xFFFF
#: the first bytes of every frame of tag 0 (deliveries have tags from 1)
NO_TAG = bytes(8)
#: the exit code of a worker that left on purpose (max_tasks, max_memory): EX_TEMPFAIL
EXIT_RECYCLED = 75
#: the exit code of a worker that stopped on a bug of its own (logged); its messages are handed on
EXIT_FAILED = 70
#: a delivery that trips an internal error of the worker is retried this often, then dead
INTERNAL_RETRIES = 3
#: completions held back while frames still wait for a slot: at most this long, this many
FLUSH_AFTER = 0.002
FLUSH_MAX = 256
#: an "auto" sync handler is measured over this many calls before it is classified
AUTO_SAMPLES = 8
#: below this share of on-CPU time, an "auto" sync handler counts as I/O-bound
AUTO_IO_BELOW = 0.5


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a worker needs, sent to it as msgpack (workers never read the environment)."""

    index: int
    #: the supervisor's pid: a worker does not outlive it
    parent: int
    cpu: int | None
    app: str
    queues: tuple[str, ...]
    input_ring: str
    output_ring: str
    concurrency: int
    log_level: str = "WARNING"
    #: ask to leave after this many messages; the supervisor lets one worker go at a time
    max_tasks: int | None = None
    #: ask to leave once the resident set grows past this (checked after each batch)
    max_memory_bytes: int | None = None
    #: ``module:factory`` of the executor (empty: ``AppExecutor`` over ``app``); the factory
    #: gets the runtime and returns an object with ``slots``, ``flush_each``, ``run`` and ``close``
    executor: str = ""
    #: with several queues: the handler slots of each (index = queue index), so that one
    #: queue's deep backlog here does not keep another's frames from a slot (empty: one lane)
    queue_slots: tuple[int, ...] = ()


class Processing:
    """What middleware sees of one message."""

    __slots__ = ("handler", "message_id", "queue", "retries", "started_at")

    def __init__(self, handler: str, message_id: str, queue: str, retries: int) -> None:
        self.handler, self.message_id, self.queue, self.retries = handler, message_id, queue, retries


def pin(cpu: int | None, index: int) -> None:
    if cpu is None:
        return
    try:
        import psutil

        psutil.Process().cpu_affinity([cpu])
        logger.info("worker %d pinned to cpu %d", index, cpu)
    except (OSError, AttributeError, ValueError) as e:  # reported, not fatal
        logger.warning("worker %d could not be pinned to cpu %d: %s", index, cpu, e)


def main(spec_bytes: bytes) -> None:
    """Entry point of a worker process (spawn)."""
    spec = msgspec.msgpack.decode(spec_bytes, type=WorkerSpec)
    # Ctrl-C and `systemctl stop` signal the whole process group: the supervisor alone decides,
    # and drains this worker by closing its input ring.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(spec.parent)
    logging.basicConfig(level=spec.log_level, format=f"%(asctime)s %(process)d worker-{spec.index} %(levelname)s %(message)s")
    pin(spec.cpu, spec.index)
    factory = _load.load(spec.executor) if spec.executor else AppExecutor
    runtime = Runtime(spec, factory)
    code = EXIT_FAILED
    try:
        run_loop(runtime.serve())
        code = EXIT_RECYCLED if runtime.retired else 0
    finally:
        # Completions are flushed and the ring closed: leave now, without joining handler threads
        # that a timeout abandoned (they would keep this process, and its core, forever).
        logging.shutdown()
        os._exit(code)


def die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this worker when the supervisor dies, even before any frame came."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def queue_slots(body: bytes) -> tuple[int, ...]:
    """Each queue's slots from a slots frame's body (little-endian uint32 per queue index)."""
    return struct.unpack(f"<{len(body) // 4}I", body[: len(body) // 4 * 4])


def slots_body(per_queue: Sequence[int]) -> bytes:
    """The body of a slots frame: each queue's slots, for ``queue_slots``."""
    return struct.pack(f"<{len(per_queue)}I", *per_queue)


class Lanes:
    """Frames waiting for a slot when a worker serves several queues: one lane per queue, each
    with its own free slots, started in turn (round robin) while the worker has slots free. A
    queue that may not run here any more keeps one slot for what it already has."""

    __slots__ = ("count", "free", "given", "lanes", "turn")

    def __init__(self, slots: Sequence[int]) -> None:
        self.lanes = [collections.deque[bytes]() for _ in slots]
        #: the slots the supervisor gave each queue here (0: it runs elsewhere now)
        self.given = list(slots)
        self.free = [max(1, n) for n in slots]
        self.count = 0
        self.turn = 0

    def __len__(self) -> int:
        return self.count

    @property
    def slots(self) -> list[int]:
        """Each queue's slots here: what it was given, or one for what it already has."""
        return [max(1, n) for n in self.given]

    def extend(self, frames: list[bytes]) -> None:
        lanes = self.lanes
        for frame in frames:  # the queue index: bytes 12..13 of the DELIVERY header
            lanes[frame[12] | frame[13] << 8].append(frame)
        self.count += len(frames)

    def take(self) -> bytes | None:
        """The next frame whose queue has a slot free, in turn; None if none has."""
        n = len(self.lanes)
        for k in range(n):
            q = (self.turn + k) % n
            if self.lanes[q] and self.free[q] > 0:
                self.free[q] -= 1
                self.count -= 1
                self.turn = (q + 1) % n
                return self.lanes[q].popleft()
        return None

    def done(self, queue_index: int) -> None:
        self.free[queue_index] += 1

    def room(self) -> bool:
        """Some queue that runs here has more slots free than frames waiting: reading more may
        fill them (a queue that runs elsewhere now gets no new frames: its slot does not count)."""
        return any(f > len(lane) and g > 0 for f, lane, g in zip(self.free, self.lanes, self.given))

    def resize(self, slots: Sequence[int]) -> None:
        for q, n in enumerate(slots[: len(self.given)]):
            self.free[q] += max(1, n) - max(1, self.given[q])
            self.given[q] = n


class Runtime:
    """The rings, the handler slots and the completion flushes of one worker process."""

    def __init__(self, spec: WorkerSpec, executor: Any) -> None:
        self.spec = spec
        self.inbox = Ring.attach(spec.input_ring)
        self.outbox = Ring.attach(spec.output_ring)
        self.executor = executor(self)
        #: handler slots free (of the executor's), and frames read but not started yet
        self.free = self.concurrency = self.executor.slots
        self.waiting: collections.deque[bytes] | Lanes = collections.deque()
        #: several queues with slots of their own: frames wait in one lane per queue
        self.lanes: Lanes | None = None
        if len(spec.queues) > 1 and spec.queue_slots:
            self.waiting = self.lanes = Lanes(spec.queue_slots)
        self.done: list[bytes] = []
        self.flush_scheduled = False
        self.flush_timer: asyncio.TimerHandle | None = None
        self.running: set[asyncio.Task[None]] = set()
        self.started = 0
        self.retired = False  # the go-ahead to recycle came
        self.input_closed = False  # the supervisor closed our input ring
        self.asked = False
        self.pulling = False

    def retiring(self) -> bool:
        """Past max_tasks or max_memory_bytes: time to ask to leave."""
        spec = self.spec
        if spec.max_tasks is not None and self.started >= spec.max_tasks:
            logger.info("worker %d asks to leave after %d messages (max_tasks_per_child)", spec.index, self.started)
            return True
        if spec.max_memory_bytes is not None and self.started:  # a batch first: a limit below
            import psutil  # a new worker's own size must not turn restarts into a loop

            rss = psutil.Process().memory_info().rss
            if rss > spec.max_memory_bytes:
                logger.info("worker %d asks to leave at %d bytes resident (max_memory_per_child_bytes=%d)",
                            spec.index, rss, spec.max_memory_bytes)
                return True
        return False

    async def serve(self) -> None:
        self.outbox.put(COMPLETION.pack(0, READY, 0.0), timeout=60)
        # The loop, looked up once: on Python 3.11 every lookup is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[None] = self.loop.create_future()
        # While the frames here fill every free slot, new ones could not start anyway: look for
        # them when a handler finishes instead of being woken for each (no syscall per frame on
        # either side).
        lanes = self.lanes
        arm_when = ((lambda: self.free > len(self.waiting)) if lanes is None else
                    (lambda: self.free > 0 and lanes.room()))
        self.reader = RingReader(self.inbox, self.on_frames, 256, on_closed=self.on_closed,
                                 arm_when=arm_when, on_error=self.failed)
        self.reader.start()
        try:
            await self.finished
        finally:
            self.reader.stop()
            self.flush()
            self.executor.close()
            self.outbox.close()

    def on_frames(self, frames: list[bytes]) -> None:
        if any(f.startswith(NO_TAG) for f in frames):  # rare: a control frame or the go-ahead
            frames = self.control(frames)
        self.started += len(frames)
        self.waiting.extend(frames)  # first: whatever happens below, these are ours to run
        if not self.asked and not self.retired and self.retiring():
            # Ask; the supervisor lets one worker go at a time and says so with a frame of tag 0
            # after the last message it gives us. Until then, work as usual.
            self.asked = True
            self.outbox.put(COMPLETION.pack(0, RETIRE, 0.0), timeout=60)
        if not self.pulling:  # handle() feeds after it decided about the flush
            self.feed()

    def say(self, status: int, payload: bytes = b"") -> None:
        """A frame of tag 0 to the supervisor: this worker speaking for itself."""
        self.outbox.put(COMPLETION.pack(0, status, 0.0) + payload, timeout=60)

    def control(self, frames: list[bytes]) -> list[bytes]:
        """Apply the frames of tag 0 at once, wherever they are; return the deliveries."""
        deliveries = []
        for frame in frames:
            if not frame.startswith(NO_TAG):
                deliveries.append(frame)
                continue
            _, slots, queue_index = DELIVERY.unpack_from(frame)
            if queue_index == CONTROL_QUEUE:  # new handler slots (autosize)
                per_queue = queue_slots(frame[DELIVERY.size :])
                logger.info("worker %d: %d handler slots (was %d)%s", self.spec.index, slots, self.concurrency,
                            f", per queue {list(per_queue)}" if self.lanes is not None and per_queue else "")
                self.free += slots - self.concurrency
                self.concurrency = slots
                if self.lanes is not None and per_queue:
                    self.lanes.resize(per_queue)
            else:  # the go-ahead to recycle, always last: finish what we have, then go
                self.retired = True
                self.reader.stop()
        return deliveries

    def failed(self, e: BaseException) -> None:
        """Reading our input failed (a bug of ours): end the worker; the supervisor hands what
        it holds to the others."""
        logger.error("worker %d: reading deliveries failed; exiting", self.spec.index, exc_info=e)
        if not self.finished.done():
            self.finished.set_exception(e)

    def on_closed(self) -> None:
        """The supervisor closed our input: finish what we have, then go."""
        self.input_closed = True
        self.feed()

    def feed(self) -> None:
        """Start handlers for waiting frames while slots are free; finish when all is done."""
        lanes = self.lanes
        while self.waiting and self.free > 0:
            if lanes is None:
                frame: bytes | None = self.waiting.popleft()  # type: ignore[union-attr]
            else:
                frame = lanes.take()
            if frame is None:  # the queues with frames here have no slot free
                break
            self.free -= 1
            t = self.loop.create_task(self.handle(frame))
            self.running.add(t)  # a strong reference: the loop keeps only a weak one
            t.add_done_callback(self.running.discard)
        idle = self.free == self.concurrency
        if (self.retired or self.input_closed) and not self.waiting and idle:
            if not self.finished.done():
                self.finished.set_result(None)

    async def handle(self, frame: bytes) -> None:
        tag, retries, queue_index = DELIVERY.unpack_from(frame)
        body = memoryview(frame)[DELIVERY.size :]
        try:
            status, delay, payload = await self.executor.run(body, retries, queue_index)
        except asyncio.CancelledError as e:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # this handler's own task is being cancelled
                raise
            # a handler let the CancelledError of something it awaited out: its slot and its
            # message must not be lost with it
            logger.exception("worker %d: delivery %d raised CancelledError", self.spec.index, tag)
            status, delay = (RETRY, 1.0) if retries < INTERNAL_RETRIES else (DEAD, 0.0)
            payload = f"the handler raised CancelledError: {e}".encode("utf-8", "backslashreplace")
        except Exception as e:  # noqa: BLE001 - a bug of ours must not lose the message
            logger.exception("worker %d: internal error on delivery %d", self.spec.index, tag)
            status, delay = (RETRY, 1.0) if retries < INTERNAL_RETRIES else (DEAD, 0.0)
            payload = f"fastq internal error: {type(e).__name__}: {e}".encode("utf-8", "backslashreplace")
        self.done.append(COMPLETION.pack(tag, status, delay) + payload)
        self.free += 1
        if self.lanes is not None:
            self.lanes.done(queue_index)
        if self.executor.flush_each:  # each frame is a whole batch: its caller waits for it
            self.flush()
            self.feed()
            return
        if not self.reader.armed and (len(self.waiting) < self.free if self.lanes is None else self.lanes.room()):
            # Local frames will not fill the free slots: take what the ring has first, so that
            # the flush below knows how much work is left here.
            self.pulling = True
            try:
                self.reader.drain()
            finally:
                self.pulling = False
        self.schedule_flush(queue_index)
        self.feed()

    def schedule_flush(self, queue_index: int) -> None:
        """Report completions now, unless this worker will still have frames of the finished
        one's queue waiting for a slot once its slot is free: then the supervisor need not refill
        yet, and completions gather for up to FLUSH_AFTER seconds (or FLUSH_MAX of them), one
        wake-up for many."""
        if self.flush_scheduled:
            return
        lanes = self.lanes
        more = (len(self.waiting) > self.free if lanes is None
                else len(lanes.lanes[queue_index]) > lanes.free[queue_index])
        if more and len(self.done) < FLUSH_MAX:
            if self.flush_timer is None:
                self.flush_timer = self.loop.call_later(FLUSH_AFTER, self.flush)
            return
        self.flush_scheduled = True
        self.loop.call_soon(self.flush)  # before the next handler starts: the supervisor refills meanwhile

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None
        if self.done:
            done, self.done = self.done, []
            self.outbox.put_many(done, timeout=60)



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
        self.pool = concurrent.futures.ThreadPoolExecutor(max(4, spec.concurrency, IO_CONCURRENCY_MAX))
        self.measured: dict[str, list[float]] = {}  # handler -> on-CPU shares of its calls
        self.consumers = [self.app.consumers.get(q) for q in spec.queues]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, body: memoryview, retries: int, queue_index: int) -> tuple[int, float, bytes]:
        """Run one delivery: its outcome, retry delay and reason (UTF-8, cut to 2,000 characters)."""
        status, delay, reason = await self.outcome(body, retries, queue_index)
        return status, delay, reason[:2000].encode("utf-8", "backslashreplace")

    async def outcome(self, body: memoryview, retries: int, queue_index: int) -> tuple[int, float, str]:
        consumer = self.consumers[queue_index]
        if consumer is not None:
            handler, args, name, message_id = consumer, (bytes(body),), consumer.name, ""
        else:
            try:
                envelope = message.decode(body)
            except Exception as e:  # noqa: BLE001 - whatever the bytes do, they are not a message
                return DEAD, 0.0, f"undecodable: {e}"
            handler = self.app.tasks.get(envelope.task)
            if handler is None:
                return DEAD, 0.0, (f"unknown task {envelope.task!r}: this app registers "
                                   f"{sorted(self.app.tasks)[:5]}; deploy the task or fix the producer")
            try:
                args = handler.decode_args(envelope.args)
            except Exception as e:  # noqa: BLE001 - ValidationError, bad UTF-8, nesting too deep...
                return DEAD, 0.0, f"invalid arguments for {envelope.task}: {e}"
            name, message_id = envelope.task, envelope.id
        options = handler.options
        processing = Processing(name, message_id, self.runtime.spec.queues[queue_index], retries)
        exc: BaseException | None = None
        try:
            for mw in self.app.middleware:
                mw.before_process(processing)
            await self.call(handler, args, name, options)
        except Exception as e:  # noqa: BLE001 - any failure of user code is the message's outcome
            exc = e
        except asyncio.CancelledError as e:  # one the handler let out of something it awaited,
            task = asyncio.current_task()     # unless this handler's own task is being cancelled
            if task is not None and task.cancelling():
                raise
            exc = e
        for mw in reversed(self.app.middleware):
            try:
                mw.after_process(processing, exc)
            except Exception as e:  # noqa: BLE001
                exc = exc or e
        if exc is None:
            return OK, 0.0, ""
        reason = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, TimeoutError):
            reason = f"timed out after {options.timeout} s ({reason})"
        if retries < options.max_retries:
            delay = options.retry_backoff * (2**retries) * random.uniform(0.5, 1.5)
            return RETRY, delay, reason
        return DEAD, 0.0, f"{reason} (after {retries + 1} attempts)"

    def report(self, queue: str, share: float) -> None:
        """Tell the supervisor what an "auto" handler measured; a report that cannot go (a full
        or closed ring) is logged and dropped: it never changes the message's own outcome."""
        kind = "io" if share < AUTO_IO_BELOW else "cpu"
        try:
            self.runtime.say(CLASSIFIED, msgspec.json.encode({"queue": queue, "kind": kind, "share": round(share, 3)}))
        except (RingFull, RingClosed) as e:
            logger.warning("worker %d: could not report queue %r as %s-bound (%s)", self.runtime.spec.index,
                           queue, kind, type(e).__name__)

    async def call(self, handler: Any, args: tuple[Any, ...], name: str, options: Any) -> None:
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
                    shares.append((time.thread_time() - cpu) / max(time.perf_counter() - wall, 1e-9))
                    if len(shares) == AUTO_SAMPLES:  # measured: the supervisor plans by it too
                        self.report(options.queue, sum(shares) / len(shares))
                return
        if kind == "cpu":
            handler.fn(*args)  # inline: this process owns its core
            return
        fut = self.runtime.loop.run_in_executor(self.pool, lambda: handler.fn(*args))
        await asyncio.wait_for(fut, options.timeout)
