"""``fastq.Pool``: a process pool on the engine's worker runtime, for code that would use
``multiprocessing.Pool`` or ``ProcessPoolExecutor``.

The caller's process plays the supervisor (ARCHITECTURE.md): one thread of the pool, the
*driver*, owns every ring. It cuts each call of ``map`` & co. into batches, writes them to the
least busy worker through the dispatcher, reads the replies and hands them to the caller's
thread (or event loop). One pinned worker process per usable core runs ``fastq.worker``'s
``Runtime`` with ``fastq.executors.pool.PoolExecutor``: a plain function inline, an ``async def`` on the
worker's uvloop with up to ``concurrency`` calls in flight.

Batches are sized from what they cost: the first batch of a call holds one item, later ones
aim at ``BATCH_SECONDS`` of worker time (by the per-item time the workers report), within
``MAX_BATCH_ITEMS`` and a share of the ring. A worker holds at most ``DEPTH`` batches, so the
last items of a call spread over every worker instead of queueing behind one.

A worker that dies (SIGKILL, a crash in C code, ``os._exit``) is started again; what it held
runs again, so a call may run twice (the function's side effects with it): a batch that lost
its worker runs again whole, a batch that lost a worker twice runs again one item per batch,
and an item that was alone on a worker that died fails with ``WorkerLost``. A function that
kills its worker every time thus fails after three worker deaths, never hangs.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import inspect
import itertools
import logging
import multiprocessing
import operator
import os
import pickle
import select
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar

import msgspec

from fastq import codec, wire, worker
from fastq.autosize import IO_CONCURRENCY_MAX, Topology, plan
from fastq.config import Config, HandlerOptions
from fastq.errors import ConfigError, PoolBroken, PoolClosed, RingClosed, RingEmpty, WorkerLost
from fastq.ring import Dispatcher, Ring

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

#: worker seconds a batch aims at once its items' cost is known: long enough that the caller's
#: share per batch (about 50 us of its CPU, taken from the workers' cores) is lost in it
BATCH_SECONDS = 0.02
#: and at most this share of what is left of a call per worker, when its length is known, so
#: that the last batches are short and end together on every worker; but not below this many
#: seconds of work, where round trips would cost more than the uneven end
TAIL_SHARE = 1 / 4
TAIL_SECONDS = 0.001
MAX_BATCH_ITEMS = 16384
#: a batch holds at most this many times the items of the largest batch measured so far: a
#: first item cheaper than the rest cannot make one worker take most of a call
GROWTH = 8
#: batches a worker holds at most: one running, the next ones waiting in its ring
DEPTH = 3
#: async calls in flight per worker, by default: the formula's high-concurrency tier (a pool
#: holds no broker prefetch; its caller already has every item)
ASYNC_CONCURRENCY = IO_CONCURRENCY_MAX
RING_BYTES = 8 << 20
#: a worker that exits this often in a row before it is ready breaks the pool
START_FAILURES = 3
_DONE = object()


class _Job:
    """One call of map, imap, imap_unordered, submit or their async forms."""

    def __init__(self, fn: Callable[..., Any], items: Iterable[Any], *, star: bool, batch_size: int | None,
                 concurrency: int, deliver: Callable[[Any], None], length: int = 0, processes: int = 1,
                 threads: bool = False) -> None:
        try:
            self.fn_ref = pickle.dumps(fn, 5)
        except Exception as e:  # noqa: BLE001 - lambdas, closures, bound methods of odd objects
            raise TypeError(f"fn {fn!r} cannot be sent to the pool's workers ({e}); define it at module "
                            f"level (a def, or functools.partial of one), as multiprocessing needs too") from None
        coroutine = inspect.iscoroutinefunction(fn)
        #: its calls overlap in a worker (coroutines, or a plain function on threads: kind="io"),
        #: so it is sized by concurrency, not by measured cost
        self.is_async = coroutine or threads
        self.flags = (codec.STAR if star else 0) | (codec.THREADS if threads and not coroutine else 0)
        self.source: Iterator[Any] | None = iter(items)
        self.seq: list[Any] | tuple[Any, ...] | None = items if isinstance(items, (list, tuple)) else None
        self.taken = 0  # items taken from the source
        self.length, self.processes = length, processes  # length: 0 when unknown
        self.outstanding = 0  # items sent whose results are not in
        self.again: collections.deque[_Batch] = collections.deque()  # to send again, first
        self.fixed = batch_size
        if self.is_async:  # enough in flight that every worker's concurrency stays busy
            self.size = batch_size or max(1, concurrency // 4)
            self.depth = max(DEPTH, -(-2 * concurrency // self.size))
        else:
            self.size, self.depth = batch_size or 1, DEPTH
        self.cost: float | None = None  # worker seconds per item
        self.bytes_per_item = 0.0  # of the last request sent, and of the largest reply seen
        self.reply_bytes_per_item = 0.0
        self.deliver = deliver  # (start, values, errors) | _DONE, called on the driver thread
        self.cancelled = False
        self.finished = False

    def take(self, max_bytes: int) -> list[Any]:
        """The next items to send, sized from their measured cost."""
        assert self.source is not None
        n = self.size
        if self.fixed is None and self.cost is not None and not self.is_async:
            n = int(min(MAX_BATCH_ITEMS, max(1, BATCH_SECONDS / max(self.cost, 1e-9)), GROWTH * self.size))
            if self.length > self.taken:
                tail = max((self.length - self.taken) / self.processes * TAIL_SHARE, TAIL_SECONDS / max(self.cost, 1e-9))
                n = max(1, min(n, int(tail)))
        per_item = max(self.bytes_per_item, self.reply_bytes_per_item)
        if per_item:
            n = max(1, min(n, int(max_bytes / per_item)))
        if self.seq is not None:  # a list or tuple: slice it (a copy of pointers, no iteration)
            items = list(self.seq[self.taken : self.taken + n])
        else:
            items = list(itertools.islice(self.source, n))
        if len(items) < n:
            self.source = self.seq = None
        return items

    def measured(self, batch: _Batch, seconds: float) -> bool:
        """Learn the per-item cost from a batch's worker time; False when sizes are not learnt."""
        if self.is_async or self.fixed is not None:
            return False
        per = seconds / len(batch.items)
        self.cost = per if self.cost is None else 0.5 * (self.cost + per)
        self.size = max(self.size, len(batch.items))
        return True


class _Batch:
    __slots__ = ("attempts", "items", "job", "start")

    def __init__(self, job: _Job, start: int, items: list[Any], attempts: int = 0) -> None:
        #: workers that died while it ran: 1, it runs again whole; 2, its items run one by one
        #: and alone on their worker (a suspect); a suspect that loses its worker is WorkerLost
        self.job, self.start, self.items, self.attempts = job, start, items, attempts

    @property
    def suspect(self) -> bool:
        return self.attempts >= 2


class _Worker:
    def __init__(self, index: int, cpu: int | None) -> None:
        self.index, self.cpu = index, cpu
        self.process: Any = None
        self.inbox: Ring | None = None
        self.outbox: Ring | None = None
        self.ready = False
        self.failures = 0  # exits before ready, in a row
        self.start_after = 0.0
        self.suspect = 0  # the tag of the suspect batch it runs alone (0: none)


class _Failure:
    """Delivered instead of results when the pool itself fails (terminated, broken)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


class _Driver:
    """The pool's thread: the only user of the rings (it is each input ring's producer and
    each output ring's consumer), and the only one to touch a job's batches."""

    def __init__(self, cpus: tuple[int | None, ...], concurrency: int, ring_bytes: int, log_level: str) -> None:
        self.ctx = multiprocessing.get_context("spawn")
        self.concurrency, self.ring_bytes, self.log_level = concurrency, ring_bytes, log_level
        #: what the workers run (``WorkerSpec.executor``)
        self.executor = "fastq.executors.pool:PoolExecutor"
        self.workers = [_Worker(i, cpu) for i, cpu in enumerate(cpus)]
        self.dispatcher = Dispatcher(len(self.workers), 1)
        self.batches: dict[int, _Batch] = {}
        self.tags = itertools.count(1)
        #: per function (its pickle): the seconds per item and batch size its last call reached,
        #: where the next call of it starts
        self.known: dict[bytes, tuple[float, int]] = {}
        #: totals since the pool started (Pool.statistics)
        self.counts = collections.Counter[str]()
        self.incoming: collections.deque[_Job] = collections.deque()  # appended by callers
        self.jobs: collections.deque[_Job] = collections.deque()  # jobs with items to send
        self.live: set[_Job] = set()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        #: None, "join" (finish the jobs, then stop) or "terminate"
        self.stopping: str | None = None
        #: held to add a job, to change ``stopping`` and while shutting down: a job is either
        #: seen by the driver or refused, never dropped between the two
        self.lock = threading.Lock()
        self.shut = False
        self.broken: BaseException | None = None
        self.checked = 0.0
        for w in self.workers:
            self.start_worker(w)
        self.thread = threading.Thread(target=self.serve, name="fastq-pool", daemon=True)
        self.thread.start()

    # -- called from any thread ---------------------------------------------------------------

    def add(self, job: _Job) -> None:
        with self.lock:
            if self.broken is not None:
                raise PoolBroken(f"the pool is broken ({self.broken}); make a new one") from self.broken
            if self.stopping is not None or self.shut:
                raise PoolClosed("the pool was closed; it takes no more calls (make a new Pool)")
            self.incoming.append(job)
        self.wake()

    def wake(self) -> None:
        try:
            self.wake_w.send(b"x")
        except OSError:  # full: a wake-up is pending anyway; closed: the pool is gone
            pass

    def stop(self, how: str, timeout: float | None = None) -> None:
        with self.lock:
            if self.stopping != "terminate":
                self.stopping = how
        self.wake()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)

    # -- the driver thread ----------------------------------------------------------------------

    def serve(self) -> None:
        try:
            while not self.done():
                while self.incoming:
                    job = self.incoming.popleft()
                    if job.fixed is None and not job.is_async and job.fn_ref in self.known:
                        job.cost, job.size = self.known[job.fn_ref]
                    self.live.add(job)
                    self.jobs.append(job)
                moved = self.collect()
                moved = self.refill() or moved
                now = time.monotonic()
                if not moved:
                    self.sleep()
                elif now - self.checked > 0.05:  # busy: still notice a dead worker soon
                    self.check_workers(select.select(self.sentinels(), [], [], 0)[0])
        except BaseException as e:
            logger.exception("fastq pool driver failed")
            self.broken = e
        finally:
            self.shutdown()

    def done(self) -> bool:
        if self.stopping == "terminate" or self.broken is not None:
            return True
        return self.stopping == "join" and not self.live and not self.incoming

    def sentinels(self) -> list[int]:
        return [w.process.sentinel for w in self.workers if w.process is not None]

    def sleep(self) -> None:
        fds: list[Any] = [self.wake_r]
        waiting: list[Ring] = []
        for w in self.workers:
            if w.outbox is not None:
                if not w.outbox.request_wakeup():
                    for ring in waiting:
                        ring.clear_wakeup()
                    return  # frames came meanwhile
                waiting.append(w.outbox)
                fds.append(w.outbox.fileno())
        fds += self.sentinels()
        restarts = [w.start_after for w in self.workers if w.process is None and w.start_after]
        timeout = 0.25 if not restarts else max(0.0, min(0.25, min(restarts) - time.monotonic()))
        try:
            readable = select.select(fds, [], [], timeout)[0]
        finally:
            for ring in waiting:
                ring.clear_wakeup()
        if self.wake_r in readable:
            try:
                self.wake_r.recv(4096)
            except BlockingIOError:
                pass
        self.check_workers(readable)

    def check_workers(self, readable: list[Any]) -> None:
        self.checked = time.monotonic()
        for w in self.workers:
            if w.process is not None and w.process.sentinel in readable:
                self.worker_exited(w)
            elif w.process is None and w.start_after and self.checked >= w.start_after:
                self.start_worker(w)

    def start_worker(self, w: _Worker) -> None:
        w.start_after = 0.0
        w.inbox, w.outbox = Ring.create(self.ring_bytes), Ring.create(self.ring_bytes)
        w.ready = False
        self.dispatcher.attach(w.index, w.inbox)
        spec = wire.WorkerSpec(index=w.index, parent=os.getpid(), cpu=w.cpu, app="", queues=("pool",),
                               input_ring=w.inbox.name, output_ring=w.outbox.name,
                               concurrency=self.concurrency, log_level=self.log_level,
                               executor=self.executor)
        w.process = self.ctx.Process(target=worker.main, args=(msgspec.msgpack.encode(spec),),
                                     name=f"fastq-pool-{w.index}", daemon=True)
        w.process.start()

    def collect(self) -> bool:
        moved = False
        for w in self.workers:
            if w.outbox is None:
                continue
            try:
                frames = w.outbox.get_many_nowait(256)
            except (RingEmpty, RingClosed):
                continue
            moved = True
            self.completions(w, frames)
        return moved

    def completions(self, w: _Worker, frames: list[bytes]) -> None:
        ok, other = self.dispatcher.complete(w.index, frames)
        for tag in ok:  # a pool worker never reports a bare OK
            raise RuntimeError(f"pool worker {w.index} completed batch {tag} without a reply")
        for tag, status, _, payload in other:
            if tag == 0:
                if status == wire.Report.READY:
                    w.ready, w.failures = True, 0
                continue
            batch = self.batches.pop(tag)
            if w.suspect == tag:
                w.suspect = 0
            job = batch.job
            job.outstanding -= len(batch.items)
            job.reply_bytes_per_item = max(job.reply_bytes_per_item, len(payload) / len(batch.items))
            self.counts["items_done"] += len(batch.items)
            if job.cancelled:
                pass
            elif status == wire.Status.RESULT:
                seconds, values, errors = codec.decode_reply(payload)
                if job.measured(batch, seconds):
                    self.known[job.fn_ref] = (job.cost, job.size)  # type: ignore[assignment]
                if errors and errors[0][0] == codec.WHOLE_BATCH:
                    values = [None] * len(batch.items)
                    errors = [(i, errors[0][1]) for i in range(len(batch.items))]
                self.deliver(job, batch.start, values, errors)
            else:  # the runtime failed on the batch (a bug of ours): its items fail with that
                e = RuntimeError(f"fastq pool worker {w.index} failed on a batch: "
                                 f"{payload.decode('utf-8', 'replace')}")
                self.deliver(job, batch.start, [None] * len(batch.items), [(i, e) for i in range(len(batch.items))])
            self.maybe_finish(job)

    def deliver(self, job: _Job, start: int, values: list[Any], errors: list[tuple[int, BaseException]]) -> None:
        if errors:  # the caller gets this exception: send no more of the job
            job.source = None
        job.deliver((start, values, errors))

    def maybe_finish(self, job: _Job) -> None:
        if job.cancelled:
            job.source = None
            job.again.clear()
        if not job.finished and job.source is None and not job.again and job.outstanding == 0:
            job.finished = True
            self.live.discard(job)
            job.deliver(_DONE)

    def pick(self, depth: int, suspect: bool = False) -> _Worker | None:
        """The worker with the fewest batches, under ``depth`` (a suspect: one with none). One
        still starting counts: its ring holds the batches until it is up (so that a call made
        as the pool starts spreads over every worker), and if it never comes up they go to
        another, as nothing it ran. A worker running a suspect takes nothing else."""
        best, load = None, 1 if suspect else depth
        for w in self.workers:
            if w.inbox is not None and not w.suspect:
                n = self.dispatcher.in_flight(w.index)
                if n < load:
                    best, load = w, n
        return best

    def refill(self) -> bool:
        """Send batches while some worker has room, the jobs taking turns."""
        moved = False
        idle = 0  # jobs in a row that could send nothing
        while self.jobs and idle < len(self.jobs):
            job = self.jobs[0]
            if job.cancelled or (job.source is None and not job.again):
                self.jobs.popleft()
                self.maybe_finish(job)
                continue
            w = self.pick(job.depth, bool(job.again) and job.again[0].suspect)
            if w is None:  # every worker holds this job's depth; another job's may be deeper
                self.jobs.rotate(-1)
                idle += 1
                continue
            if job.again:
                batch = job.again.popleft()
            else:
                try:
                    items = job.take(self.max_batch_bytes)
                except Exception as e:  # noqa: BLE001 - the caller's iterable raised: its call fails
                    job.source = job.seq = None
                    self.deliver(job, job.taken, [None], [(0, e)])
                    continue
                if not items:
                    continue  # the source just ran out: the check above finishes the job
                batch = _Batch(job, job.taken, items)
                job.taken += len(items)
            tag = self.send(w, batch)
            if tag is None:
                job.again.appendleft(batch)
                idle += 1
            else:
                moved, idle = True, 0
                if batch.suspect and tag:
                    w.suspect = tag
            self.jobs.rotate(-1)  # the next job's turn: calls share the workers
        return moved

    @property
    def max_batch_bytes(self) -> int:
        return self.ring_bytes // (DEPTH + 1)

    def send(self, w: _Worker, batch: _Batch) -> int | None:
        """Write the batch to ``w``: its tag, 0 when it was handled without sending (an error,
        a split), None when the ring has no room now."""
        job = batch.job
        try:
            body = codec.encode_request(job.fn_ref, job.flags, batch.items)
        except TypeError as e:
            self.deliver(job, batch.start, [None] * len(batch.items), [(i, e) for i in range(len(batch.items))])
            return 0
        job.bytes_per_item = len(body) / len(batch.items)
        assert w.inbox is not None
        if len(body) + 64 > w.inbox.max_frame_bytes:
            if len(batch.items) > 1:
                half = len(batch.items) // 2
                job.again.extendleft([_Batch(job, batch.start + half, batch.items[half:], batch.attempts),
                                      _Batch(job, batch.start, batch.items[:half], batch.attempts)])
            else:
                big = ConfigError(f"an argument of {len(body)} bytes (encoded) does not fit the pool's rings of "
                                  f"{self.ring_bytes} bytes; make the Pool with ring_bytes= above {2 * len(body)}")
                self.deliver(job, batch.start, [None], [(0, big)])
            return 0
        tag = next(self.tags)
        if self.dispatcher.dispatch_to(w.index, [(tag, 0, 0, body)]):
            return None
        self.batches[tag] = batch
        job.outstanding += len(batch.items)
        self.counts["batches"] += 1
        self.counts["items_sent"] += len(batch.items)
        return tag

    def worker_exited(self, w: _Worker) -> None:
        """Take what the worker finished, run again what it held, start another in its place."""
        w.process.join()
        code, pid = w.process.exitcode, w.process.pid
        if w.outbox is not None:
            while True:
                try:
                    frames = w.outbox.get_many_nowait(256)
                except (RingEmpty, RingClosed):
                    break
                self.completions(w, frames)
        lost = self.dispatcher.detach(w.index)
        for ring in (w.inbox, w.outbox):
            if ring is not None:
                ring.close()
                ring.unlink()
        w.inbox = w.outbox = w.process = None
        was_ready, w.ready = w.ready, False
        if self.stopping == "terminate":
            return
        if not was_ready:
            w.failures += 1
            logger.error("pool worker %d (pid %s) exited (%s) before it was ready; its output above says why",
                         w.index, pid, _exit_reason(code))
            if w.failures >= START_FAILURES:
                raise PoolBroken(f"pool worker {w.index} exited before it was ready {w.failures} times in a row "
                                 f"(last: {_exit_reason(code)}); its output says why")
        else:
            self.counts["workers_lost"] += 1
            logger.warning("pool worker %d (pid %s) died (%s) holding %d batches; running them again",
                           w.index, pid, _exit_reason(code), len(lost))
        # What ran when the worker died: a plain function's batches run one after the other,
        # so the oldest it held; an async (or threaded) job's batches run together, so all of
        # them. The rest waited in its ring: they go again as they were.
        running = {t for t in lost if self.batches[t].job.is_async}
        plain = [t for t in lost if t not in running]
        if plain:
            running.add(plain[0])
        w.suspect = 0
        for tag in lost:
            batch = self.batches.pop(tag)
            job = batch.job
            job.outstanding -= len(batch.items)
            if job.cancelled:
                self.maybe_finish(job)
                continue
            if not was_ready or tag not in running:  # it never ran: not the items' fault
                again = [batch]
            elif batch.suspect:
                e = WorkerLost(f"pool worker {w.index} (pid {pid}) died ({_exit_reason(code)}) while running this "
                               f"call alone, after two workers died running it with others; the function may end "
                               f"its process (os._exit, a crash in C code, the out-of-memory killer)")
                self.deliver(job, batch.start, [None], [(0, e)])
                self.maybe_finish(job)
                continue
            elif batch.attempts == 0:
                again = [_Batch(job, batch.start, batch.items, 1)]
            else:  # one by one, each alone on a worker
                again = [_Batch(job, batch.start + i, [x], 2) for i, x in enumerate(batch.items)]
            job.again.extend(again)
            self.counts["items_again"] += len(batch.items)
            if job not in self.jobs:
                self.jobs.append(job)
        # the batches to run again go in order of their items
        for job in self.jobs:
            if len(job.again) > 1:
                job.again = collections.deque(sorted(job.again, key=lambda b: b.start))
        w.start_after = time.monotonic() + (0.5 * 2 ** (w.failures - 1) if w.failures else 0.0)
        if not w.failures:
            self.start_worker(w)

    def shutdown(self) -> None:
        error: BaseException = self.broken or PoolClosed("the pool was terminated before this call finished")
        with self.lock:
            self.shut = True  # add() refuses from now on: the snapshot below is every job
        for job in list(self.live) + list(self.incoming):
            if not job.finished:
                job.finished = True
                job.deliver(_Failure(error))
        self.live.clear()
        self.incoming.clear()
        graceful = self.stopping == "join" and self.broken is None
        for w in self.workers:
            if w.inbox is not None:
                w.inbox.close()  # a worker drains its ring, then exits
        for w in self.workers:
            if w.process is not None:
                if graceful:
                    w.process.join(5)
                if w.process.exitcode is None:
                    w.process.kill()
                w.process.join()
            for ring in (w.inbox, w.outbox):
                if ring is not None:
                    ring.close()
                    ring.unlink()
            w.inbox = w.outbox = w.process = None
        self.wake_r.close()
        self.wake_w.close()


class _Results:
    """A job's replies for a caller's thread: (start, values, errors) chunks, then _DONE."""

    def __init__(self, *, at_end: bool = False) -> None:
        self.chunks: collections.deque[Any] = collections.deque()
        self.ready = threading.Condition(threading.Lock())
        #: wake the caller only when the job ended (map): one thread switch per call, not per batch
        self.at_end = at_end

    def put(self, chunk: Any) -> None:
        if self.at_end and chunk is not _DONE and not isinstance(chunk, _Failure):
            self.chunks.append(chunk)  # deque.append is atomic; the caller reads after _DONE
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
            if chunk is _DONE:
                return
            if isinstance(chunk, _Failure):
                raise chunk.error
            yield chunk


def _unordered(chunks: Iterable[tuple[int, list[Any], list[tuple[int, BaseException]]]],
               cancel: Callable[[], None]) -> Iterator[Any]:
    try:
        for _, values, errors in chunks:
            if errors:
                yield from values[: errors[0][0]]
                raise errors[0][1]
            yield from values
    finally:
        cancel()


def _ordered(chunks: Iterable[tuple[int, list[Any], list[tuple[int, BaseException]]]],
             cancel: Callable[[], None]) -> Iterator[Any]:
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


def _gathered(chunks: list[tuple[int, list[Any], list[tuple[int, BaseException]]]]) -> list[Any]:
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


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[Any], None], arg: Any) -> None:
    """Hand ``arg`` to the caller's event loop; a loop that has closed (the caller gave up and
    left asyncio.run) gets nothing, and the driver goes on."""
    try:
        loop.call_soon_threadsafe(fn, arg)
    except RuntimeError:
        pass


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

    def __init__(self, processes: int | None = None, *, kind: Literal["auto", "io", "cpu"] = "auto",
                 concurrency: int | None = None, ring_bytes: int = RING_BYTES, log_level: str = "WARNING") -> None:
        if kind not in ("auto", "io", "cpu"):
            raise ConfigError(f"kind must be 'auto', 'io' or 'cpu', got {kind!r}")
        if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
            raise ConfigError(f"concurrency must be a positive int (calls in flight per process), got {concurrency!r}")
        if ring_bytes < 64 << 10:
            raise ConfigError(f"ring_bytes must be at least 65536, got {ring_bytes}")
        if not isinstance(log_level, str) or log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"log_level must be one of debug, info, warning, error, critical; got {log_level!r}")
        #: processes, pinning and the rules behind them, as ``fastq plan`` explains them
        self.plan = plan(Topology.detect(), [HandlerOptions(queue="pool", kind=kind)], Config(processes=processes))
        self.processes = self.plan.processes
        self.kind = kind
        self.concurrency = concurrency or ASYNC_CONCURRENCY
        cpus = self.plan.pinned or (None,) * self.processes
        self._driver = _Driver(tuple(cpus), self.concurrency, ring_bytes, log_level.upper())
        # leaving without close/terminate (or the interpreter exiting) leaks neither processes
        # nor shared memory
        self._finalizer = weakref.finalize(self, self._driver.stop, "terminate", 10)

    def _job(self, fn: Callable[..., Any], items: Iterable[Any], batch_size: int | str, deliver: Callable[[Any], None],
             star: bool = False) -> _Job:
        if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
            raise ConfigError(f"batch_size must be 'auto' or a positive int, got {batch_size!r}")
        job = _Job(fn, items, star=star, batch_size=None if batch_size == "auto" else int(batch_size),
                   concurrency=self.concurrency, deliver=deliver, length=operator.length_hint(items),
                   processes=self.processes, threads=self.kind == "io")
        self._driver.add(job)
        return job

    def map(self, fn: Callable[[T], R], iterable: Iterable[T], *, batch_size: int | str = "auto") -> list[R]:
        """``[fn(x) for x in iterable]``, over the workers.

        Raises:
            Exception: the first item's (in order) exception, as ``fn`` raised it, with the
                worker's traceback as ``__cause__``; later items are not started.
            WorkerLost: an item's worker died each time it ran (see the module's docstring).
        """
        results = _Results(at_end=True)
        self._job(fn, iterable, batch_size, results.put)
        return _gathered(list(results))

    def imap(self, fn: Callable[[T], R], iterable: Iterable[T], *, batch_size: int | str = "auto") -> Iterator[R]:
        """Like ``map``, yielding results in order as they come; an exception ends the iteration
        at its item. Leaving the loop early cancels what was not sent yet."""
        return self._iterate(fn, iterable, batch_size, _ordered)

    def imap_unordered(self, fn: Callable[[T], R], iterable: Iterable[T], *,
                       batch_size: int | str = "auto") -> Iterator[R]:
        """Like ``imap``, in the order the results come back."""
        return self._iterate(fn, iterable, batch_size, _unordered)

    def _iterate(self, fn: Callable[..., Any], iterable: Iterable[Any], batch_size: int | str,
                 order: Callable[[Any, Callable[[], None]], Iterator[Any]]) -> Iterator[Any]:
        results = _Results()
        job = self._job(fn, iterable, batch_size, results.put)  # starts now, not at the first next()
        cancel = functools.partial(self._cancel, job)
        iterator = order(results, cancel)
        weakref.finalize(iterator, cancel)  # dropped before its first next(), its finally never runs
        return iterator

    def _cancel(self, job: _Job) -> None:
        """The caller left before the end: send no more, drop what comes back."""
        if not job.finished:
            job.cancelled = True
            self._driver.wake()

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[R]:
        """Run ``fn(*args, **kwargs)`` in a worker; the future gets its result or exception."""
        future: concurrent.futures.Future[R] = concurrent.futures.Future()

        def deliver(chunk: Any) -> None:  # on the driver thread
            if chunk is _DONE or future.done():
                return
            try:
                if isinstance(chunk, _Failure):
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

    async def map_async(self, fn: Callable[[T], R] | Callable[[T], Awaitable[R]], iterable: Iterable[T], *,
                        batch_size: int | str = "auto") -> list[R]:
        """``map`` for a caller inside an event loop: awaiting it never blocks the loop."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[R]] = loop.create_future()
        chunks: list[Any] = []

        def finish(chunk: Any) -> None:
            if done.done():
                return
            if isinstance(chunk, _Failure):
                done.set_exception(chunk.error)
                return
            try:
                done.set_result(_gathered(chunks))
            except BaseException as e:  # noqa: BLE001 - the first item's exception is the result
                done.set_exception(e)

        def deliver(chunk: Any) -> None:  # on the driver thread
            if chunk is _DONE or isinstance(chunk, _Failure):
                _call_soon(loop, finish, chunk)
            else:
                chunks.append(chunk)

        job = self._job(fn, iterable, batch_size, deliver)
        try:
            return await done
        finally:
            self._cancel(job)  # when the caller was cancelled

    async def aimap_unordered(self, fn: Callable[[T], R] | Callable[[T], Awaitable[R]], iterable: Iterable[T], *,
                              batch_size: int | str = "auto") -> AsyncIterator[R]:
        """``imap_unordered`` for a caller inside an event loop (an async iterator)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        def deliver(chunk: Any) -> None:  # on the driver thread
            _call_soon(loop, queue.put_nowait, chunk)

        job = self._job(fn, iterable, batch_size, deliver)
        try:
            while True:
                chunk = await queue.get()
                if chunk is _DONE:
                    return
                if isinstance(chunk, _Failure):
                    raise chunk.error
                for value in _unordered([chunk], lambda: None):
                    yield value
        finally:
            self._cancel(job)

    @property
    def pids(self) -> list[int | None]:
        """The worker processes' pids now (None while one is being replaced)."""
        return [w.process.pid if w.process is not None else None for w in self._driver.workers]

    def statistics(self) -> dict[str, int]:
        """Totals since the pool started: ``batches`` and ``items_sent`` to workers,
        ``items_done`` (replies in), ``items_again`` (sent again after their worker died),
        ``workers_lost`` (workers that died after they were ready; each was replaced)."""
        counts = self._driver.counts
        return {k: counts[k] for k in ("batches", "items_sent", "items_done", "items_again", "workers_lost")}

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
            raise ValueError("join() needs close() or terminate() first, as multiprocessing.Pool does")
        self._driver.stop(self._driver.stopping, timeout)
        if not self._driver.thread.is_alive():
            self._finalizer.detach()

    def terminate(self) -> None:
        """Stop now: kill the workers, fail the calls not finished with ``PoolClosed``."""
        self._driver.stop("terminate")
        self._finalizer.detach()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        """Leaving normally waits for the calls made (``close`` + ``join``); leaving on an
        exception terminates."""
        if exc_type is None:
            self.close()
            self.join()
        else:
            self.terminate()
