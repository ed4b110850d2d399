"""``fastq.Pool``'s driver thread: the caller's process plays the supervisor (ARCHITECTURE.md).

One thread owns every ring of the pool's fleet (fastq.engine.fleet, the same worker runtime the
engine runs): it is each input ring's producer and each output ring's consumer. It cuts each
call into batches (fastq.pool.job), writes them to the least busy worker through the
dispatcher, reads the replies and hands them to the caller's thread or event loop; what
becomes of each batch is fastq.pool.batches'.

A worker that dies (SIGKILL, a crash in C code, ``os._exit``) is started again; what it held runs
again, so a call may run twice (the function's side effects with it). What ran when it died takes a
death by the pool's rule (``fastq.pool.batches.DEATHS``): a batch runs again whole, then its items
run one per batch and alone on an idle worker (suspects), and an item that was alone on a worker
that died fails with ``WorkerLost``. A function that kills its worker every time thus fails after
three worker deaths, never hangs. What waited in the dead worker's ring goes again as it was.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import socket
import threading
import time
from typing import Any

from fastq import wire
from fastq.autosize.claims import CoreClaim
from fastq.config import Config
from fastq.engine.fleet import Fleet, Member
from fastq.errors import PoolBroken, PoolClosed, RingClosed, RingEmpty
from fastq.pool.batches import Batches
from fastq.pool.job import Failure, Job
from fastq.ring import Dispatcher, Ring

logger = logging.getLogger(__name__)

#: a worker stopped (SIGSTOP) this long is killed and replaced (as Config's default for the engine)
STOPPED_TIMEOUT = Config().worker_stopped_timeout
#: a worker that exits this often in a row before it is ready breaks the pool
START_FAILURES = 3
#: seconds the driver sleeps at most with nothing to do (it also watches the workers)
IDLE_SECONDS = 0.25
#: while busy, it still looks for a dead worker this often (seconds)
CHECK_SECONDS = 0.05


def exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit code {code}"


class Driver:
    """The pool's thread: the only user of the rings, and the only one to touch a job's
    batches."""

    def __init__(
        self,
        cpus: tuple[int | None, ...],
        concurrency: int,
        ring_bytes: int,
        log_level: str,
        cores: CoreClaim | None = None,
    ) -> None:
        self.concurrency, self.ring_bytes, self.log_level = concurrency, ring_bytes, log_level
        #: the cores this pool claimed on the host, released when it stops
        self.cores = cores
        #: what the workers run (``WorkerSpec.executor``)
        self.executor = "fastq.executors.pool:PoolExecutor"
        self.dispatcher = Dispatcher(len(cpus), 1)
        self.fleet = Fleet(
            cpus, self.dispatcher, self.spec_for, ring_bytes=ring_bytes, name="fastq-pool"
        )
        self.batches = Batches(self.fleet, ring_bytes)
        self.incoming: collections.deque[Job] = collections.deque()  # appended by callers
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
        self.fleet.sweep()
        for m in self.fleet:
            self.fleet.start(m)
        self.thread = threading.Thread(target=self.serve, name="fastq-pool", daemon=True)
        self.thread.start()

    def spec_for(self, m: Member) -> wire.WorkerSpec:
        assert m.inbox is not None and m.outbox is not None
        return wire.WorkerSpec(
            index=m.index,
            parent=os.getpid(),
            cpu=m.cpu,
            app="",
            queues=("pool",),
            input_ring=m.inbox.name,
            output_ring=m.outbox.name,
            concurrency=self.concurrency,
            executor=self.executor,
            log_level=self.log_level,
        )

    # -- called from any thread ---------------------------------------------------------------

    def add(self, job: Job) -> None:
        with self.lock:
            if self.broken is not None:
                raise PoolBroken(
                    f"the pool is broken ({self.broken}); make a new one"
                ) from self.broken
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
                    self.batches.admit(self.incoming.popleft())
                moved = self.collect()
                moved = self.batches.refill() or moved
                now = time.monotonic()
                if not moved:
                    self.sleep()
                elif now - self.checked > CHECK_SECONDS:  # busy: still notice a dead worker soon
                    self.check_workers(select.select(list(self.fleet.sentinels()), [], [], 0)[0])
        except BaseException as e:
            logger.exception("fastq pool driver failed")
            self.broken = e
        finally:
            self.shutdown()

    def done(self) -> bool:
        if self.stopping == "terminate" or self.broken is not None:
            return True
        return self.stopping == "join" and not self.batches.live and not self.incoming

    def sleep(self) -> None:
        fds: list[Any] = [self.wake_r]
        waiting: list[Ring] = []
        for m in self.fleet:
            if m.outbox is not None:
                if not m.outbox.request_wakeup():
                    for ring in waiting:
                        ring.clear_wakeup()
                    return  # frames came meanwhile
                waiting.append(m.outbox)
                fds.append(m.outbox.fileno())
        fds += list(self.fleet.sentinels())
        restarts = [m.start_after for m in self.fleet if m.process is None and m.start_after]
        timeout = (
            IDLE_SECONDS
            if not restarts
            else max(0.0, min(IDLE_SECONDS, min(restarts) - time.monotonic()))
        )
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
        for m in self.fleet.kill_stopped(STOPPED_TIMEOUT, self.checked):  # its exit comes next
            logger.warning(
                "pool worker %d (pid %s) was stopped for %g s or more (SIGSTOP?) and was killed",
                m.index,
                m.process.pid,
                STOPPED_TIMEOUT,
            )
        sentinels = self.fleet.sentinels()
        for fd in readable:
            if fd in sentinels:
                self.worker_exited(sentinels[fd])
        for m in self.fleet:
            if m.process is None and m.start_after and self.checked >= m.start_after:
                m.start_after = 0.0
                self.fleet.start(m)

    def collect(self, m: Member | None = None) -> bool:
        """Read the replies there are (of ``m`` only, when given)."""
        moved = False
        for w in [m] if m is not None else self.fleet.members:
            while w.outbox is not None:
                try:
                    frames = w.outbox.get_many_nowait(256)
                except (RingEmpty, RingClosed):
                    break
                moved = True
                self.batches.completions(w, frames)
                if m is None:
                    break  # one read per worker per turn: the others' replies wait no longer
        return moved

    def worker_exited(self, m: Member) -> None:
        """Take what the worker finished, run again what it held, start another in its place."""
        self.collect(m)
        gone = self.fleet.reap(m)
        if self.stopping == "terminate":
            return
        reason = exit_reason(gone.code)
        if gone.before_ready:
            logger.error(
                "pool worker %d (pid %s) exited (%s) before it was ready; its output above "
                "says why",
                m.index,
                gone.pid,
                reason,
            )
            if m.failures >= START_FAILURES:
                raise PoolBroken(
                    f"pool worker {m.index} exited before it was ready {m.failures} "
                    f"times in a row (last: {reason}); its output says why"
                )
        else:
            self.batches.counts["workers_lost"] += 1
            logger.warning(
                "pool worker %d (pid %s) died (%s) holding %d batches; running them again",
                m.index,
                gone.pid,
                reason,
                len(gone.lost),
            )
        self.batches.lost(gone, reason)
        m.start_after = time.monotonic() + gone.restart_in
        if not m.failures:
            m.start_after = 0.0
            self.fleet.start(m)

    def shutdown(self) -> None:
        error: BaseException = self.broken or PoolClosed(
            "the pool was terminated before this call finished"
        )
        with self.lock:
            self.shut = True  # add() refuses from now on: the snapshot below is every job
        for job in list(self.batches.live) + list(self.incoming):
            if not job.finished:
                job.finished = True
                job.deliver(Failure(error))
        self.batches.live.clear()
        self.incoming.clear()
        graceful = self.stopping == "join" and self.broken is None
        self.fleet.close_inputs()  # a worker drains its ring, then exits
        if graceful:
            for m in self.fleet:
                if m.process is not None:
                    m.process.join(5)
        self.fleet.kill_remaining()
        self.fleet.release_all()
        self.wake_r.close()
        self.wake_w.close()
        if self.cores is not None:
            self.cores.release()
