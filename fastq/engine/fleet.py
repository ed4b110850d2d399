"""The worker processes of one host, written once for both front doors (the supervisor and
``fastq.Pool``): spawn, pin, watch, restart with backoff, suspects run alone, three deaths,
recycle one at a time, drain, close and unlink.

The decisions are apart from the I/O so that they can be tested without processes:
``restart_delay`` (the backoff), ``DeathPolicy`` (what a parcel of work that lost its worker
becomes), ``Recycling`` (who may leave, one at a time) and ``Fleet.place_suspects`` (a suspect
runs alone on an idle worker, and one worker is kept free of new work until one is). The I/O is
``Fleet.start`` (two rings, the dispatcher, a spawned process) and ``Fleet.reap`` (what is left
of one that exited), through a ``Launcher`` that tests replace.

The owner watches each member's ``process.sentinel`` its own way (an event loop's reader, a
select loop), calls ``reap`` when it fires, and starts the member again when ``restart_in``
says; it also reads the completions, because what they mean is its business.
"""

from __future__ import annotations

import collections
import enum
import logging
import multiprocessing
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import msgspec

from fastq import worker
from fastq.ring import Dispatcher, Ring, sweep_dead_segments
from fastq.wire import EXIT_RECYCLED, WorkerSpec

logger = logging.getLogger(__name__)

#: a parcel of work in flight at this many worker deaths is given up (dead-lettered, WorkerLost)
MAX_WORKER_DEATHS = 3
#: seconds before the first restart of a worker that exited before it was ready; doubling, to
RESTART_MIN, RESTART_MAX = 0.5, 30.0


def restart_delay(failures: int) -> float:
    """Seconds before starting again a worker that exited before it was ready ``failures``
    times in a row (0: at once)."""
    return 0.0 if failures <= 0 else min(RESTART_MAX, RESTART_MIN * 2 ** (failures - 1))


class Fate(enum.Enum):
    """What a parcel of work whose worker died becomes."""

    #: dispatched again as usual
    AGAIN = "again"
    #: runs alone on an idle worker, so that a further death names it
    SUSPECT = "suspect"
    #: it killed its worker MAX_WORKER_DEATHS times: dead-lettered (engine), WorkerLost (pool)
    GIVE_UP = "give up"


class DeathPolicy(NamedTuple):
    """How deaths count, for an owner's parcels (a message, a batch of calls).

    A parcel that ran alone when its worker died is the certain cause: one more death. One in a
    crowd gets one death at most, unless the owner knows it was running (``counts_every_death``:
    a pool runs a plain function's batches one at a time, so it knows which one ran).
    """

    #: from this many deaths on, a parcel runs alone
    alone_from: int = 1
    counts_every_death: bool = False
    give_up_at: int = MAX_WORKER_DEATHS

    def after_death(self, deaths: int, alone: bool) -> tuple[int, Fate]:
        """The parcel's deaths once its worker died, and what it becomes."""
        deaths = deaths + 1 if alone or self.counts_every_death else max(deaths, 1)
        if deaths >= self.give_up_at:
            return deaths, Fate.GIVE_UP
        return deaths, Fate.SUSPECT if deaths >= self.alone_from else Fate.AGAIN


class Member:
    """One worker slot of the fleet: its process while it has one, and its two rings."""

    def __init__(self, index: int, cpu: int | None) -> None:
        self.index, self.cpu = index, cpu
        self.process: Any = None
        self.inbox: Ring | None = None
        self.outbox: Ring | None = None
        #: it attached its rings and loaded its executor (its READY report came)
        self.ready = False
        #: exits in a row before it became ready (a bad deploy): restarts back off
        self.failures = 0
        #: allowed to leave (recycle): it gets no new work, only the go-ahead frame
        self.leaving = False
        #: the suspect running alone here; nothing else goes to this worker meanwhile
        self.solo: int | None = None
        #: when its owner should start it again (monotonic seconds; 0: not waiting to)
        self.start_after = 0.0
        #: since when (monotonic seconds) it is seen stopped (SIGSTOP); 0: it runs
        self.stopped_since = 0.0
        #: the watchdog killed it (stopped too long): what it held is not at fault
        self.killed_stopped = False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    @property
    def usable(self) -> bool:
        """Takes work now, or will once it is up (not recycling, restarting or gone)."""
        return not self.leaving and self.alive


class Exit(NamedTuple):
    """What is left of a worker that exited (``Fleet.reap``)."""

    member: Member
    pid: int | None
    code: int | None
    #: it left on purpose (max_tasks, max_memory), not a death
    recycled: bool
    #: it exited before its READY report: a failure to start, not a death
    before_ready: bool
    #: the tags it held (ascending): none of them is its any more
    lost: list[int]
    #: the suspect it ran alone, if any
    solo: int | None
    #: seconds until it should start again
    restart_in: float
    #: the watchdog killed it for being stopped too long: no death for what it held
    stopped: bool = False


class Launcher(Protocol):
    """The I/O of starting a worker: its rings and its process."""

    def rings(self, size_bytes: int) -> tuple[Ring, Ring]: ...

    def spawn(self, spec: WorkerSpec, name: str) -> Any: ...


class ProcessLauncher:
    """Rings in shared memory and a process of the ``spawn`` start method running
    ``fastq.worker.main``."""

    def __init__(self) -> None:
        self.ctx = multiprocessing.get_context("spawn")

    def rings(self, size_bytes: int) -> tuple[Ring, Ring]:
        return Ring.create(size_bytes), Ring.create(size_bytes)

    def spawn(self, spec: WorkerSpec, name: str) -> Any:
        process = self.ctx.Process(
            target=worker.main, args=(msgspec.msgpack.encode(spec),), name=name, daemon=True
        )
        process.start()
        return process


class Recycling:
    """Workers that asked to leave, and the one leaving now: one at a time, in the order asked,
    so that the host never loses more than one worker's capacity to recycling."""

    def __init__(self) -> None:
        self.asked: collections.deque[int] = collections.deque()
        self.leaving: int | None = None

    def ask(self, index: int) -> None:
        if index not in self.asked:
            self.asked.append(index)

    def forget(self, index: int) -> None:
        """It exited: it no longer asks."""
        if index in self.asked:
            self.asked.remove(index)

    def grant(self, may: Callable[[int], bool]) -> int | None:
        """The next to go, if none is leaving now: the first that asked and ``may`` (it is
        still up); those that may not are forgotten."""
        while self.leaving is None and self.asked:
            index = self.asked.popleft()
            if may(index):
                self.leaving = index
                return index
        return None

    def refused(self, index: int) -> None:
        """Its go-ahead could not be sent (a full ring): it asks again first, next time."""
        self.leaving = None
        self.asked.appendleft(index)

    def back(self, index: int) -> bool:
        """Its replacement is up: True when it was the one leaving (the next may go)."""
        if self.leaving != index:
            return False
        self.leaving = None
        return True


class Fleet:
    """The members, their rings in the dispatcher, and the decisions that span them.

    Parameters:
        cpus: the CPU of each member (None: not pinned); one member per entry.
        dispatcher: the core's dispatcher that writes to the members' input rings.
        spec: the WorkerSpec a member is started with.
        ring_bytes: the size of each of a member's two rings.
        name: the process name prefix (``fastq-worker``, ``fastq-pool``).
    """

    def __init__(
        self,
        cpus: Sequence[int | None],
        dispatcher: Dispatcher,
        spec: Callable[[Member], WorkerSpec],
        *,
        ring_bytes: int,
        name: str,
        launcher: Launcher | None = None,
    ) -> None:
        self.members = [Member(i, cpu) for i, cpu in enumerate(cpus)]
        self.dispatcher, self.spec, self.ring_bytes, self.name = dispatcher, spec, ring_bytes, name
        self.launcher: Launcher = launcher or ProcessLauncher()
        #: tags of suspects waiting to run alone, oldest first
        self.suspects: collections.deque[int] = collections.deque()
        #: a member kept free of new work so that a waiting suspect can run alone on it
        self.reserved: int | None = None
        self.recycling = Recycling()

    def __iter__(self) -> Any:
        return iter(self.members)

    def __getitem__(self, index: int) -> Member:
        return self.members[index]

    # -- I/O --------------------------------------------------------------------------------

    def sweep(self) -> None:
        """Remove what a fastq process tree killed whole left in /dev/shm (its rings; the resource
        tracker that would have unlinked them died with it). Only segments whose creator is gone
        (pid and start time), never a live process's."""
        removed = sweep_dead_segments()
        if removed:
            logger.warning(
                "removed %d ring segments that fastq processes which are gone left in "
                "/dev/shm (%s%s)",
                len(removed),
                ", ".join(removed[:3]),
                ", ..." if len(removed) > 3 else "",
            )

    def start(self, m: Member) -> None:
        """Two rings, attached to the dispatcher, and a process that attaches them too."""
        m.inbox, m.outbox = self.launcher.rings(self.ring_bytes)
        m.ready = m.leaving = False
        self.dispatcher.attach(m.index, m.inbox)
        self.refresh(m)  # accepts work once READY
        m.process = self.launcher.spawn(self.spec(m), f"{self.name}-{m.index}")

    def reap(self, m: Member) -> Exit:
        """A member whose process exited: join it, take back the tags it held, close and unlink
        its rings. Read its completions before (they still count: nothing done is redone)."""
        m.process.join()
        code, pid, m.process = m.process.exitcode, m.process.pid, None
        lost, solo, m.solo = self.dispatcher.detach(m.index), m.solo, None
        self.dispatcher.set_accepting(m.index, False)
        self._release(m)
        before_ready, m.ready, m.leaving = not m.ready, False, False
        if before_ready:
            m.failures += 1
        if self.reserved == m.index:
            self.reserved = None
            self.refresh_all()
        self.recycling.forget(m.index)
        recycled = code == EXIT_RECYCLED  # not 0: a handler's os._exit(0) is no recycle
        stopped, m.killed_stopped, m.stopped_since = m.killed_stopped, False, 0.0
        return Exit(
            m, pid, code, recycled, before_ready, lost, solo, restart_delay(m.failures), stopped
        )

    def became_ready(self, m: Member) -> None:
        m.ready, m.failures = True, 0
        self.refresh(m)

    def close_inputs(self) -> None:
        """Close the input ring of every live member: each finishes what it has, writes it
        back and exits."""
        for m in self.members:
            if m.alive and m.inbox is not None:
                m.inbox.close()

    def kill_remaining(self) -> None:
        """SIGKILL the members still alive, and join every process."""
        for m in self.members:
            if m.alive:
                m.process.kill()
            if m.process is not None:
                m.process.join()

    def release_all(self) -> None:
        """Close and unlink every ring left: nothing stays in /dev/shm."""
        for m in self.members:
            self._release(m)

    def _release(self, m: Member) -> None:
        for ring in (m.inbox, m.outbox):
            if ring is not None:
                ring.close()
                ring.unlink()
        m.inbox = m.outbox = None

    def kill_stopped(self, timeout: float, now: float) -> list[Member]:
        """The watchdog: SIGKILL each live member that has been stopped (SIGSTOP, SIGTSTP, a
        debugger) for ``timeout`` seconds or more, and return them; its owner sees them exit as
        usual, and what they held goes to the others as not at fault (``Exit.stopped``)."""
        killed = []
        for m in self.members:
            if not m.alive or m.killed_stopped:
                continue
            if not process_stopped(m.process.pid):
                m.stopped_since = 0.0
                continue
            m.stopped_since = m.stopped_since or now
            if now - m.stopped_since >= timeout:
                m.killed_stopped = True
                m.process.kill()  # SIGKILL ends a stopped process too
                killed.append(m)
        return killed

    def sentinels(self) -> dict[int, Member]:
        return {m.process.sentinel: m for m in self.members if m.process is not None}

    # -- who takes work ---------------------------------------------------------------------

    def accepting(self, m: Member) -> bool:
        """Whether the dispatcher may give ``m`` new work (suspects go by ``place_suspects``)."""
        return m.ready and not m.leaving and m.solo is None and m.index != self.reserved and m.alive

    def refresh(self, m: Member) -> None:
        self.dispatcher.set_accepting(m.index, self.accepting(m))

    def refresh_all(self) -> None:
        for m in self.members:
            self.refresh(m)

    def leave(self, m: Member) -> None:
        """``m`` may recycle: it gets no new work from now on."""
        m.leaving = True
        self.refresh(m)

    def stay(self, m: Member) -> None:
        m.leaving = False
        self.refresh(m)

    def passed(self, m: Member) -> bool:
        """After completions of ``m``: True when its suspect is no longer there (it passed, or
        failed in an ordinary way) and it takes work again."""
        if m.solo is not None and not self.dispatcher.holds(m.index, m.solo):
            m.solo = None
            self.refresh(m)
            return True
        return False

    # -- suspects ---------------------------------------------------------------------------

    def place_suspects(
        self, may_run: Callable[[int, int], bool], send: Callable[[Member, int], bool | None]
    ) -> None:
        """Put each waiting suspect alone on an idle, ready member that ``may_run(tag, index)``
        (``send`` writes it there; False: it could not, and it waits on; None: there is nothing
        to run any more). While suspects wait and no member is idle, keep the least busy one
        that may run one free of new work until it is."""
        d = self.dispatcher
        alive = [m for m in self.members if m.ready and not m.leaving and m.alive]
        for m in alive:
            if not self.suspects:
                break
            if m.solo is None and not d.in_flight(m.index):
                tag = next((t for t in self.suspects if may_run(t, m.index)), None)
                if tag is None:
                    continue
                self.suspects.remove(tag)
                sent = send(m, tag)
                if sent is None:
                    continue
                if not sent:
                    self.suspects.appendleft(tag)  # its ring is closed: the worker is going
                    continue
                m.solo = tag
                if self.reserved == m.index:
                    self.reserved = None
                self.refresh(m)
        may = {m.index for m in self.members if any(may_run(t, m.index) for t in self.suspects)}
        if (
            self.reserved is not None and self.reserved not in may
        ):  # no waiting suspect may run there
            r, self.reserved = self.members[self.reserved], None
            self.refresh(r)
        if self.suspects and self.reserved is None:
            free = [m for m in alive if m.solo is None and m.index in may]
            if free:
                self.reserved = min(free, key=lambda m: d.in_flight(m.index)).index
                self.refresh(self.members[self.reserved])


def process_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (state T or t in /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"T", b"t")
