"""A worker process: pinned to one core, one uvloop loop, frames in from one ring, completions out.

Workers never touch the broker. ``Runtime`` owns the two rings, the handler slots and the
completion flushes; what a delivery means is its executor's business (fastq.executors: the app's
tasks for the engine, batches of calls for fastq.Pool), loaded by the name in
``WorkerSpec.executor``. Every frame is fastq.wire's: deliveries and control frames in,
completions and reports out.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
from collections.abc import Callable, Sequence
from typing import Protocol

import msgspec

from fastq import _load, logs, wire
from fastq._aio import run_loop
from fastq.autosize.topology import pin, resident_bytes
from fastq.ring import Ring, RingReader
from fastq.wire import DELIVERY, Control, Status, WorkerSpec

logger = logging.getLogger(__name__)

#: a delivery that trips an internal error of the worker is retried this often, then dead
INTERNAL_RETRIES = 3
#: completions held back while frames still wait for a slot: at most this long, this many
FLUSH_AFTER = 0.002
FLUSH_MAX = 256
#: what the metrics counted goes to the supervisor at most this often (with a batch of
#: completions, or alone once the batches stop): a report a flush cost ~1 us a noop message
REPORT_EVERY = 0.25
_RETRY, _DEAD = int(Status.RETRY), int(Status.DEAD)


class Executor(Protocol):
    """What runs a worker's deliveries (fastq.executors); made by ``factory(runtime)``."""

    #: handler slots: how many deliveries may run at once
    slots: int
    #: report each completion at once (its caller waits for it) instead of gathering them
    flush_each: bool

    async def run(
        self, body: memoryview, attempt: int, queue_index: int
    ) -> tuple[int, float, bytes]:
        """One delivery: its status, the retry delay in seconds and the payload."""
        ...

    def close(self) -> None: ...

    def reports(self) -> list[bytes]:
        """Report frames to send with the next batch of completions (Report.TALLY)."""
        ...


def pin_to(cpu: int | None, index: int) -> None:
    why = pin(cpu)
    if cpu is None:
        return
    if why is None:
        logger.info("worker %d pinned to cpu %d", index, cpu)
    else:  # reported, not fatal
        logger.warning("worker %d could not be pinned to cpu %d: %s", index, cpu, why)


def main(spec_bytes: bytes) -> None:
    """Entry point of a worker process (spawn)."""
    spec = msgspec.msgpack.decode(spec_bytes, type=WorkerSpec)
    # Ctrl-C and `systemctl stop` signal the whole process group: the supervisor alone decides,
    # and drains this worker by closing its input ring.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(spec.parent)
    logs.install(
        spec.log_level,
        spec.log_format,
        f"%(asctime)s %(process)d worker-{spec.index} %(levelname)s %(message)s",
    )
    pin_to(spec.cpu, spec.index)
    runtime = Runtime(spec, _load.load(spec.executor))
    code = wire.EXIT_FAILED
    try:
        run_loop(runtime.serve())
        code = wire.EXIT_RECYCLED if runtime.retired else 0
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
        lanes, queue_of = self.lanes, wire.delivery_queue
        for frame in frames:
            lanes[queue_of(frame)].append(frame)
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

    def __init__(self, spec: WorkerSpec, executor: Callable[[Runtime], Executor]) -> None:
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
        self.next_report = 0.0  # loop time: the metrics' counts go with the first flush after
        self.report_timer: asyncio.TimerHandle | None = None
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
            logger.info(
                "worker %d asks to leave after %d messages (max_tasks_per_child)",
                spec.index,
                self.started,
            )
            return True
        if spec.max_memory_bytes is not None and self.started:  # a batch first: a limit below
            rss = resident_bytes()  # a new worker's own size must not turn restarts into a loop
            if rss > spec.max_memory_bytes:
                logger.info(
                    "worker %d asks to leave at %d bytes resident (max_memory_per_child_bytes=%d)",
                    spec.index,
                    rss,
                    spec.max_memory_bytes,
                )
                return True
        return False

    async def serve(self) -> None:
        self.outbox.put(wire.ready_report(), timeout=60)
        # The loop, looked up once: on Python 3.11 every lookup is a getpid() system call.
        self.loop = asyncio.get_running_loop()
        self.finished: asyncio.Future[None] = self.loop.create_future()
        # While the frames here fill every free slot, new ones could not start anyway: look for
        # them when a handler finishes instead of being woken for each (no syscall per frame on
        # either side). A worker with nothing running always looks: frames that its queues'
        # lanes would not make room for (a queue moved elsewhere since) are still its to run.
        lanes = self.lanes
        arm_when = (
            (lambda: self.free > len(self.waiting))
            if lanes is None
            else (lambda: (self.free > 0 and lanes.room()) or not self.running)
        )
        self.reader = RingReader(
            self.inbox,
            self.on_frames,
            256,
            on_closed=self.on_closed,
            arm_when=arm_when,
            on_error=self.failed,
        )
        self.reader.start()
        try:
            await self.finished
        finally:
            self.reader.stop()
            self.flush()
            self.report()
            self.executor.close()
            self.outbox.close()

    def on_frames(self, frames: list[bytes]) -> None:
        if any(map(wire.is_control, frames)):  # rare: new slots, or the go-ahead to leave
            frames = self.control(frames)
        self.started += len(frames)
        self.waiting.extend(frames)  # first: whatever happens below, these are ours to run
        if not self.asked and not self.retired and self.retiring():
            # Ask; the supervisor lets one worker go at a time and says so with a frame of tag 0
            # after the last message it gives us. Until then, work as usual.
            self.asked = True
            self.say(wire.retire_report())
        if not self.pulling:  # handle() feeds after it decided about the flush
            self.feed()

    def say(self, report: bytes) -> None:
        """A report to the supervisor (fastq.wire): this worker speaking for itself."""
        self.outbox.put(report, timeout=60)

    def control(self, frames: list[bytes]) -> list[bytes]:
        """Apply the control frames at once, wherever they are; return the deliveries."""
        deliveries = []
        for frame in frames:
            if not wire.is_control(frame):
                deliveries.append(frame)
                continue
            kind, body = wire.parse_control(frame)
            if kind is Control.SLOTS:  # autosize moved the handler slots
                slots = wire.parse_slots(body)
                per_queue = slots.per_queue
                logger.info(
                    "worker %d: %d handler slots (was %d)%s",
                    self.spec.index,
                    slots.total,
                    self.concurrency,
                    f", per queue {list(per_queue)}"
                    if self.lanes is not None and per_queue
                    else "",
                )
                self.free += slots.total - self.concurrency
                self.concurrency = slots.total
                if self.lanes is not None and per_queue:
                    self.lanes.resize(per_queue)
            else:  # Control.RECYCLE, always last: finish what we have, then go
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
        done = (self.retired or self.input_closed) and not self.waiting and idle
        if done and not self.finished.done():
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
            status, delay = (
                (_RETRY, 1.0) if retries & wire.RETRIES_MASK < INTERNAL_RETRIES else (_DEAD, 0.0)
            )
            payload = f"the handler raised CancelledError: {e}".encode("utf-8", "backslashreplace")
        except Exception as e:
            logger.exception("worker %d: internal error on delivery %d", self.spec.index, tag)
            status, delay = (
                (_RETRY, 1.0) if retries & wire.RETRIES_MASK < INTERNAL_RETRIES else (_DEAD, 0.0)
            )
            payload = f"fastq internal error: {type(e).__name__}: {e}".encode(
                "utf-8", "backslashreplace"
            )
        self.done.append(wire.COMPLETION.pack(tag, status, delay) + payload)
        self.free += 1
        if self.lanes is not None:
            self.lanes.done(queue_index)
        if self.executor.flush_each:  # each frame is a whole batch: its caller waits for it
            self.flush()
            self.feed()
            return
        if not self.reader.armed and (
            len(self.waiting) < self.free
            if self.lanes is None
            else self.lanes.room() or len(self.running) <= 1  # this handler's task is the last
        ):
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
        more = (
            len(self.waiting) > self.free
            if lanes is None
            else len(lanes.lanes[queue_index]) > lanes.free[queue_index]
        )
        if more and len(self.done) < FLUSH_MAX:
            if self.flush_timer is None:
                self.flush_timer = self.loop.call_later(FLUSH_AFTER, self.flush)
            return
        self.flush_scheduled = True
        # before the next handler starts: the supervisor refills meanwhile
        self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.flush_timer is not None:
            self.flush_timer.cancel()
            self.flush_timer = None
        if self.done:
            done, self.done = self.done, []
            if self.spec.metrics:  # what they count, in the same batch, at most REPORT_EVERY
                if self.loop.time() >= self.next_report:
                    done.extend(self.executor.reports())
                    self.next_report = self.loop.time() + REPORT_EVERY
                elif self.report_timer is None:  # the last counts go even if no batch follows
                    self.report_timer = self.loop.call_at(self.next_report, self.report)
            self.outbox.put_many(done, timeout=60)

    def report(self) -> None:
        """Send what the metrics counted since the last report, alone."""
        if self.report_timer is not None:
            self.report_timer.cancel()
            self.report_timer = None
        frames = self.executor.reports()
        if frames:
            self.next_report = self.loop.time() + REPORT_EVERY
            self.outbox.put_many(frames, timeout=60)
