"""The parent process: owns the broker, the rings and the workers; dispatches, settles, restarts.

For each queue it fetches while the host's prefetch budget has room, gives each delivery to the
live worker with the fewest in flight, and settles completions in batches (ack, retry, dead).
A worker that dies hands its in-flight messages to the others at once and is started again.
Each of them is a suspect from then on and runs alone on an idle worker, so that a further death
names one message: bystanders pass and are done, and the one that killed its worker three times
is dead-lettered as such.
SIGTERM/SIGINT: stop fetching, let in-flight work finish within ``shutdown_timeout``, settle it,
give the rest back to the broker, exit 0; a second signal gives everything back at once.

The per-delivery work (choosing the worker, framing into its ring, keeping each worker's
in-flight tags, reading completions) is ``fastq.ring.Dispatcher``, in the Cython core; this
module decides which workers accept work and what becomes of each outcome.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import multiprocessing
import os
import signal
import time
from typing import Any

import msgspec

from fastq import wire, worker
from fastq.autosize import IO_CONCURRENCY_MAX, Plan
from fastq._aio import Signal, run_loop
from fastq.broker.base import Retry
from fastq.config import Config
from fastq.errors import RingClosed, RingFull
from fastq.ring import Dispatcher, Ring, RingReader
from fastq.wire import Report, Status

logger = logging.getLogger(__name__)

#: a message in flight at this many worker deaths is dead-lettered
MAX_WORKER_DEATHS = 3
#: seconds a pump waits in the broker for new messages when it has nothing to settle
IDLE_WAIT = 0.25


class _Pending:
    __slots__ = ("queue", "delivery", "deaths", "item")

    def __init__(self, queue: str, delivery: Any, item: tuple[int, int, int, bytes]) -> None:
        self.queue, self.delivery, self.deaths = queue, delivery, 0
        #: what the dispatcher routes: (tag, retries, queue index, body)
        self.item = item


def _parts() -> dict[str, list[Any]]:
    return {"ack": [], "retry": [], "dead": [], "release": []}


class _Worker:
    def __init__(self, index: int, cpu: int | None) -> None:
        self.index, self.cpu = index, cpu
        self.process: Any = None
        self.inbox: Any = None
        self.outbox: Any = None
        #: the suspect running alone here; nothing else is dispatched to this worker meanwhile
        self.solo: int | None = None
        #: it attached its rings and loaded the app (its READY completion came)
        self.ready = False
        #: exits in a row before it became ready (a bad deploy): restarts back off
        self.failures = 0
        #: allowed to leave (recycle): it gets no new work, only the go-ahead frame
        self.leaving = False
        #: the handler slots this worker was told it has, and of those, each queue's
        self.slots = 0
        self.queue_slots: tuple[int, ...] = ()
        self.reader: RingReader | None = None


def run_app(app: Any, app_spec: str, queues: list[str] | None = None, *, log_level: str = "WARNING") -> int:
    """Plan the workers of ``app`` (with ``app.config`` as it stands) and run them until
    SIGTERM/SIGINT; returns the exit code. What ``fastq worker`` and ``App.run`` do.

    Raises:
        ConfigError: a queue has no task or consumer, or the broker URL is bad (said before
            anything starts).
    """
    from fastq.autosize import plan_app

    broker = app.broker  # a bad URL raises here
    the_plan = plan_app(app, queues)
    queues = [q.name for q in the_plan.queues]
    logger.info("fastq worker %s on %s", app_spec, broker.url)
    for line in the_plan.explain().splitlines():
        logger.info("plan: %s", line)
    return Supervisor(app, app_spec, the_plan, app.config, queues, log_level=log_level).run_forever()


class Supervisor:
    def __init__(self, app: Any, app_spec: str, plan: Plan, config: Config, queues: list[str],
                 log_level: str = "WARNING") -> None:
        self.app, self.app_spec, self.plan, self.config = app, app_spec, plan, config
        self.queues = queues
        self.queue_index = {q: i for i, q in enumerate(queues)}
        self.log_level = log_level
        self.broker = app.broker
        self.prefetch = {q.name: q.prefetch for q in plan.queues}
        #: each queue's concurrency on the host now (the plan's, then the controller's)
        self.queue_concurrency = {q.name: q.concurrency for q in plan.queues}
        #: the workers each queue runs on now: the plan's, or for a CPU queue whose share of the
        #: cores is smaller, one per handler (place_cpu_queues)
        self.queue_workers = {q.name: q.workers for q in plan.queues}
        #: handler slots per worker process: the busiest process's share of all queues
        self.concurrency = self.slots_needed()
        self.settled_by_queue = collections.Counter[str]()
        #: the controller's recent changes: (unix time, queue, reason), newest last
        self.decisions: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=100)
        #: per queue, the autosize controller (while autosize runs), and what its "auto"
        #: handlers measured as
        self.controllers: dict[str, Any] = {}
        self.measured_kinds: dict[str, str] = {}
        self.pending: dict[int, _Pending] = {}
        self.backlog: collections.deque[tuple[int, int, int, bytes]] = collections.deque()  # items dispatched nowhere yet
        self.suspects: collections.deque[int] = collections.deque()  # held by a worker that died
        self.tags = itertools.count(1)
        self.in_flight = dict.fromkeys(queues, 0)
        # per queue: outcomes waiting for its pump, the ones it is applying now, and its wake-up
        self.outcomes: dict[str, dict[str, list[Any]]] = {q: _parts() for q in queues}
        self.settling: dict[str, dict[str, list[Any]]] = {}
        self.wake = {q: Signal() for q in queues}
        self.settled_event = Signal()
        self.ready_event = Signal()  # set at every READY
        self.stopped = asyncio.Event()
        self.pumps: list[asyncio.Task[None]] = []
        self.stopping = False
        self.signals = 0
        self.last_signal = (0, 0.0)
        self.ctx = multiprocessing.get_context("spawn")
        pinned = plan.pinned or (None,) * plan.processes
        self.workers = [_Worker(i, pinned[i]) for i in range(plan.processes)]
        self.dispatcher = Dispatcher(plan.processes, len(queues))
        #: per queue index, the workers that may run it (the plan's processes=)
        self.allowed = [set(range(plan.processes)) for _ in queues]
        for q in plan.queues:
            if q.name in self.queue_index and len(q.workers) < plan.processes:
                self.allowed[self.queue_index[q.name]] = set(q.workers)
                self.dispatcher.allow(self.queue_index[q.name], q.workers)
        self.place_cpu_queues()  # a CPU queue planned with fewer handlers than workers
        self.concurrency = self.slots_needed()
        self.settled = collections.Counter[str]()
        self.exits: set[asyncio.Task[None]] = set()  # workers being replaced
        self.tasks: set[asyncio.Task[Any]] = set()
        #: a worker kept free of new work so that a waiting suspect can run alone on it
        self.reserved: int | None = None
        #: workers that asked to recycle, and the one recycling now (one at a time)
        self.want_to_leave: collections.deque[int] = collections.deque()
        self.recycling: int | None = None

    # -- workers ----------------------------------------------------------------------------

    def start_worker(self, w: _Worker) -> None:
        size = self.config.ring_size_bytes
        w.inbox, w.outbox = Ring.create(size), Ring.create(size)
        w.ready = w.leaving = False
        self.dispatcher.attach(w.index, w.inbox)
        self.refresh(w)  # accepts work once READY
        w.slots, w.queue_slots = self.concurrency, self.slots_of(w.index)
        spec = wire.WorkerSpec(index=w.index, parent=os.getpid(), cpu=w.cpu, app=self.app_spec, queues=tuple(self.queues),
                               input_ring=w.inbox.name, output_ring=w.outbox.name,
                               concurrency=self.concurrency, executor="fastq.executors.app:AppExecutor",
                               log_level=self.log_level,
                               max_tasks=self.config.max_tasks_per_child,
                               max_memory_bytes=self.config.max_memory_per_child_bytes,
                               queue_slots=w.queue_slots, io_threads=IO_CONCURRENCY_MAX)
        w.process = self.ctx.Process(target=worker.main, args=(msgspec.msgpack.encode(spec),),
                                     name=f"fastq-worker-{w.index}", daemon=True)
        w.process.start()
        loop = asyncio.get_running_loop()
        loop.add_reader(w.process.sentinel, self.worker_exited, w)
        w.reader = RingReader(w.outbox, functools.partial(self.completions, w), on_error=self.reader_failed)
        w.reader.start()

    def worker_exited(self, w: _Worker) -> None:
        asyncio.get_running_loop().remove_reader(w.process.sentinel)
        w.process.join()
        self.dispatcher.set_accepting(w.index, False)
        self.place_cpu_queues()
        task = self.spawn(self.replace_worker(w))
        self.exits.add(task)
        task.add_done_callback(self.exits.discard)

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        """A task whose failure is logged, never silently dropped."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def reader_failed(self, e: BaseException) -> None:
        """A completion reader hit a bug of ours: stop as SIGTERM does (what is unsettled goes
        back to the broker) rather than run on with a stream nobody reads."""
        logger.error("reading completions failed; stopping", exc_info=e)
        self.stop()

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("supervisor task failed; stopping", exc_info=task.exception())
            self.stop()

    async def replace_worker(self, w: _Worker) -> None:
        """Apply what the worker finished, hand on what it did not, start another in its place."""
        code = w.process.exitcode
        self.end_completions(w)
        lost, solo, w.solo = self.dispatcher.detach(w.index), w.solo, None
        for ring in (w.inbox, w.outbox):
            ring.close()
            ring.unlink()
        recycled = code == wire.EXIT_RECYCLED  # not 0: a handler's os._exit(0) is no recycle
        if self.reserved == w.index:
            self.reserved = None
            self.refresh_all()
        if w.index in self.want_to_leave:
            self.want_to_leave.remove(w.index)
        if not w.ready and not lost:
            w.failures += 1
            delay = min(30.0, 0.5 * 2 ** (w.failures - 1))
            logger.error("worker %d (pid %s) exited with %s before it was ready (its log says why); "
                         "starting it again in %.1f s", w.index, w.process.pid, code, delay)
            if not self.stopping:
                await asyncio.sleep(delay)
                if not self.stopping:
                    self.start_worker(w)
            return
        if recycled:
            logger.info("worker %d (pid %s) recycled; %d unread messages go to the others",
                        w.index, w.process.pid, len(lost))
        else:
            logger.warning("worker %d (pid %s) exited with %s holding %d messages; handing them on",
                           w.index, w.process.pid, code, len(lost))
        dead = []
        for tag in lost:
            p = self.pending[tag]
            if not recycled:
                # Alone, a suspect is the certain cause; in a crowd, each gets one death at most.
                p.deaths = p.deaths + 1 if solo == tag else max(p.deaths, 1)
            if p.deaths >= MAX_WORKER_DEATHS:
                dead.append(tag)
            elif p.deaths:
                self.suspects.append(tag)
            else:
                self.backlog.append(p.item)
        if not self.stopping:
            self.start_worker(w)
        self.dispatch_backlog()
        if dead:
            self.settle([], [], [(t, f"killed its worker {MAX_WORKER_DEATHS} times "
                                           f"(last exit code {code})") for t in dead], [])

    def end_completions(self, w: _Worker) -> None:
        """Apply every completion a worker that has exited wrote, then stop its reader.

        The completions still count, so that nothing done is redone.
        """
        if w.reader is None:
            return
        w.reader.drain()
        w.reader.stop()
        w.reader = None

    def let_one_go(self) -> None:
        """Grant the next recycle, if none is under way: the worker gets no more work, then the
        go-ahead frame behind everything it already has."""
        while self.recycling is None and self.want_to_leave and not self.stopping:
            w = self.workers[self.want_to_leave.popleft()]
            if not (w.ready and w.process.is_alive()):
                continue
            self.recycling, w.leaving = w.index, True
            self.refresh(w)
            self.place_cpu_queues()
            logger.info("worker %d may recycle now", w.index)
            try:
                w.inbox.put_nowait(wire.recycle_frame())
            except (RingFull, RingClosed):
                w.leaving, self.recycling = False, None  # try again at its next request
                self.refresh(w)
                self.place_cpu_queues()
                self.want_to_leave.appendleft(w.index)
                return

    # -- dispatch ---------------------------------------------------------------------------

    def accepting(self, w: _Worker) -> bool:
        """Whether the dispatcher may give ``w`` new work (suspects go by ``dispatch_to``)."""
        return (w.ready and not w.leaving and w.solo is None and w.index != self.reserved
                and w.process is not None and w.process.is_alive())

    def refresh(self, w: _Worker) -> None:
        self.dispatcher.set_accepting(w.index, self.accepting(w))

    def refresh_all(self) -> None:
        for w in self.workers:
            self.refresh(w)

    def dispatch_backlog(self) -> None:
        d = self.dispatcher
        if self.suspects or self.reserved is not None:
            self.place_suspects()
        if self.backlog:
            left = d.dispatch(self.backlog)
            self.backlog.clear()
            self.backlog.extend(left)

    def place_suspects(self) -> None:
        d = self.dispatcher
        alive = [w for w in self.workers if w.ready and not w.leaving and w.process.is_alive()]
        for w in alive:  # each alone on an idle worker that may run its queue
            if not self.suspects:
                break
            if w.solo is None and not d.in_flight(w.index):
                tag = next((t for t in self.suspects
                            if w.index in self.allowed[self.queue_index[self.pending[t].queue]]), None)
                if tag is None:
                    continue
                self.suspects.remove(tag)
                if d.dispatch_to(w.index, [self.pending[tag].item]):
                    self.suspects.appendleft(tag)  # its ring is closed: the worker is going
                    continue
                w.solo = tag
                if self.reserved == w.index:
                    self.reserved = None
                self.refresh(w)
        may = set().union(*(self.allowed[self.queue_index[self.pending[t].queue]] for t in self.suspects))
        if self.reserved is not None and self.reserved not in may:  # no waiting suspect may run there
            w, self.reserved = self.workers[self.reserved], None
            self.refresh(w)
        if self.suspects and self.reserved is None:
            # None is idle: keep the least busy one that may run a waiting suspect free of new
            # work until it is
            free = [w for w in alive if w.solo is None and w.index in may]
            if free:
                self.reserved = min(free, key=lambda w: d.in_flight(w.index)).index
                self.refresh(self.workers[self.reserved])

    async def pump(self, queue: str) -> None:
        """The queue's one loop: settle what finished and claim what there is room for, in one
        broker round trip, then dispatch. Everything that finished during a round trip goes in
        the next one, so a busy engine pays one round trip per many messages.

        It waits in the broker (up to ``IDLE_WAIT`` seconds) only for new messages; an outcome to
        settle ends that wait at once. A failed round trip is retried, nothing dropped.
        """
        wake, limit, index = self.wake[queue], self.config.max_message_bytes, self.queue_index[queue]
        pause, too_large = 0.5, []
        while True:
            wake.clear()
            parts = self.outcomes[queue]
            settling = sum(map(len, parts.values()))
            room = 0 if self.stopping else self.prefetch[queue] - self.in_flight[queue] + settling
            want = min(room, self.config.batch_max)
            if not settling and want <= 0:
                await wake.wait()
                continue
            self.outcomes[queue], self.settling[queue] = _parts(), parts
            try:
                deliveries = await self.broker.exchange(
                    queue, **parts, fetch=max(want, 0), timeout=0.0 if settling else IDLE_WAIT, wake=wake)
            except Exception:  # noqa: BLE001 - whatever the broker raised, try again
                logger.exception("settling %d and fetching %d messages on %r failed; retrying in %.1f s",
                                 settling, max(want, 0), queue, pause)
                for kind, items in parts.items():  # in front of what came meanwhile
                    self.outcomes[queue][kind][:0] = items
                del self.settling[queue]
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)
                continue
            pause = 0.5
            del self.settling[queue]
            if settling:
                self.in_flight[queue] -= settling
                self.settled_by_queue[queue] += settling
                for kind, items in parts.items():
                    self.settled[kind] += len(items)
                self.settled_event.set()
            for d in deliveries:
                tag = next(self.tags)
                p = self.pending[tag] = _Pending(queue, d, (tag, d.retries, index, d.body))
                self.in_flight[queue] += 1
                if len(d.body) > limit:
                    too_large.append((tag, f"message of {len(d.body)} bytes exceeds max_message_bytes={limit}"))
                else:
                    self.backlog.append(p.item)
            if too_large:
                self.settle([], [], too_large, [])
                too_large = []
            if deliveries:
                self.dispatch_backlog()

    # -- autosize ---------------------------------------------------------------------------

    def slots_needed(self) -> int:
        """Handler slots per worker process: the busiest process's share of all queues."""
        return max(1, max(sum(self.slots_of(i)) for i in range(self.plan.processes)))

    def slots_of(self, index: int) -> tuple[int, ...]:
        """Worker ``index``'s share of each queue's concurrency (in queue index order)."""
        from fastq.autosize import split

        return tuple(split(self.queue_concurrency[q], self.queue_workers[q], self.plan.processes)[index]
                     for q in self.queues)

    async def control(self) -> None:
        """Every LOOK_TICK seconds read the settled counts and the cores; each queue's
        controller looks when its own interval has passed (``Controller.next_look``: 2 s, 1 s
        at the start and after an increase), judged on its own window without the settling
        start. At each look: share the host among the busy queues, let the due controllers
        decide, apply what changed (prefetch at once; concurrency by telling each worker its
        slots; a CPU queue's share also by the workers it runs on)."""
        from fastq.autosize import (
            CONTROL_INTERVAL,
            LOOK_TICK,
            PRESS_MEMORY,
            RAMP_INTERVAL,
            LoadMeter,
            Sample,
            settle_for,
            share_slots,
            steady_rate,
        )

        meter = LoadMeter(self.plan.topology, self.plan.pinned)
        plans = {q.name: q for q in self.plan.queues}
        controllers = self.controllers
        for q in self.plan.queues:  # a queue reclassified before this started keeps its controller
            if q.name in self.queue_index:
                self.controller(q)
        loop = asyncio.get_running_loop()
        #: per queue: when it last looked, and how long until its next look
        due: dict[str, tuple[float, float]] = {}
        # when each queue last had work waiting at the broker at two reads in a row (one read
        # may catch a queue that keeps up between a publish and its pump's next round trip)
        waited: dict[str, float] = {}
        ready_before: dict[str, int] = {}
        history: collections.deque[tuple[float, collections.Counter[str], tuple[float, float]]] = collections.deque()
        while not self.stopping:
            await asyncio.sleep(LOOK_TICK)
            now = loop.time()
            history.append((now, collections.Counter(self.settled_by_queue), meter.snapshot()))
            while history[0][0] < now - 2 * CONTROL_INTERVAL:
                history.popleft()
            for name in controllers:  # the start is a change of load: the first look comes soon
                due.setdefault(name, (now, RAMP_INTERVAL))
            looking = [n for n, (at, wait) in due.items() if now - at >= wait - LOOK_TICK / 2]
            if not looking:
                continue
            headroom = meter.memory_headroom()
            backlogs: dict[str, int] = {}
            for name in controllers:
                try:
                    backlogs[name] = (await self.broker.queue_depth(name)).ready
                except Exception as e:  # noqa: BLE001 - the broker is down: decide next time
                    logger.warning("autosize: no queue depth for %r (%s); holding", name, e)
                    due[name] = (now, CONTROL_INTERVAL)
                if backlogs.get(name, 0) > 0 and ready_before.get(name, 0) > 0:
                    waited[name] = now
                ready_before[name] = backlogs.get(name, 0)
            # Queues with work (demand) share the host by weight: I/O ones its handlers, CPU ones
            # its cores, weighed against the busy queues that press for them (work waiting)
            decided: list[str] = []
            shared = {n: c for n, c in controllers.items() if not c.user_fixed}
            caps = share_slots({n: plans[n].options.weight for n in shared},
                               {n: backlogs.get(n, 0) > 0 or self.in_flight[n] > 0 for n in shared},
                               floors={n: c.min_concurrency for n, c in shared.items() if c.kind == "io"},
                               cores={n: c.cpu_cores for n, c in shared.items() if c.kind == "cpu"},
                               pressing={n for n in shared if now - waited.get(n, -PRESS_MEMORY) < PRESS_MEMORY})
            for name, controller in list(controllers.items()):
                if name not in backlogs:
                    continue
                d = controller.cap(caps[name]) if name in caps else None
                if d is not None and d.reason:  # its share moved: judge what follows at the usual pace
                    due[name] = (now, CONTROL_INTERVAL)
                    decided.append(name)
                elif name in looking:
                    at, wait = due[name]
                    start = at + settle_for(wait) + LOOK_TICK / 2
                    first = max((i for i, h in enumerate(history) if h[0] <= start), default=0)
                    window = list(itertools.islice(history, first, None))
                    if len(window) < 2 or window[-1][0] - window[0][0] < (wait - settle_for(wait)) / 2:
                        continue  # too little of its window was read (the awaits took long): next tick
                    throughput = steady_rate([t for t, _, _ in window], [c[name] for _, c, _ in window])
                    busy = meter.busy_between(window[0][2], window[-1][2])
                    latency = self.in_flight[name] / throughput if throughput > 0 else wait
                    d = controller.step(Sample(busy=busy, backlog=backlogs[name], throughput=throughput,
                                               latency=latency, memory_headroom=headroom))
                    due[name] = (now, controller.next_look(latency))
                    decided.append(name)
                if d is not None and d.reason:
                    logger.info("autosize: queue %r: %s; concurrency %d, prefetch %d",
                                name, d.reason, d.concurrency, d.prefetch)
                    self.decisions.append((time.time(), name, d.reason))
                    self.queue_concurrency[name] = d.concurrency  # before any await: classified() may run
                    if controller.kind == "cpu":
                        self.place_cpu_queues()
                    self.wake[name].set()
                    if d.prefetch != self.prefetch[name]:
                        self.prefetch[name] = d.prefetch
                        try:
                            await self.broker.prefetch(name, d.prefetch)
                        except Exception as e:  # noqa: BLE001 - the broker is down: its reconnect applies it
                            logger.warning("autosize: prefetch %d for %r not applied at the broker yet (%s)",
                                           d.prefetch, name, e)
            stamp = loop.time()  # after the awaits above: the next window starts here
            for name in decided:
                due[name] = (stamp, due[name][1])
            self.concurrency = self.slots_needed()
            self.tell_slots()

    def place_cpu_queues(self) -> None:
        """Give each CPU queue one worker per handler of its share (CPU handlers run inline: one
        per worker at a time): workers that take work now before the others (one that is
        recycling, restarting or gone is passed over while others can), apart from the other CPU
        queues where there are enough; the plan's workers when it has them all. Called again
        whenever a share or a worker's state changes; messages already on a worker finish there."""
        start, changed, taken = 0, False, set[int]()
        for q in self.plan.queues:
            controller = self.controllers.get(q.name)
            if (controller.kind if controller is not None else q.kind) != "cpu" or q.name not in self.queue_index:
                continue
            k, mine = self.queue_concurrency[q.name], q.workers
            if k >= len(mine):
                workers = mine
            else:
                turn = [mine[(start + i) % len(mine)] for i in range(len(mine))]
                rank = {i: (not self.usable(self.workers[i]), i in taken, n) for n, i in enumerate(turn)}
                workers = tuple(sorted(sorted(turn, key=rank.__getitem__)[:k]))
            start += k
            taken.update(workers)
            if workers != self.queue_workers[q.name]:
                self.queue_workers[q.name] = workers
                index = self.queue_index[q.name]
                self.allowed[index] = set(workers)
                self.dispatcher.allow(index, workers)
                changed = True
                logger.info("queue %r now runs on worker processes %s (one per CPU handler of its %d)",
                            q.name, list(workers), k)
        if changed:
            self.concurrency = self.slots_needed()
            self.tell_slots()
            if self.backlog:
                self.dispatch_backlog()  # what waited for a worker that is not there goes elsewhere

    @staticmethod
    def usable(w: _Worker) -> bool:
        """Takes work now, or will once it is up (not recycling, restarting or gone)."""
        return not w.leaving and w.process is not None and w.process.is_alive()

    def tell_slots(self) -> None:
        """Send each live worker its handler slots, and each queue's, where they changed (a
        full ring: next time)."""
        for w in self.workers:
            per_queue = self.slots_of(w.index)
            if ((w.slots, w.queue_slots) != (self.concurrency, per_queue) and w.ready and not w.leaving
                    and w.process.is_alive()):
                frame = wire.slots_frame(self.concurrency, per_queue if len(per_queue) > 1 else ())  # one queue: all its slots
                try:
                    w.inbox.put_nowait(frame)
                    w.slots, w.queue_slots = self.concurrency, per_queue
                except (RingFull, RingClosed):
                    pass

    def statistics(self) -> dict[str, Any]:
        """Per queue: concurrency, prefetch, in flight and settled; and the controller's recent
        decisions with their reasons."""
        return {
            "queues": {q: {"concurrency": self.queue_concurrency[q], "prefetch": self.prefetch[q],
                           "in_flight": self.in_flight[q], "settled": self.settled_by_queue[q]}
                       for q in self.queues},
            "handler_slots_per_worker": self.concurrency,
            "decisions": list(self.decisions),
        }

    # -- completions ------------------------------------------------------------------------

    def completions(self, w: _Worker, frames: list[bytes]) -> None:
        ack, other = self.dispatcher.complete(w.index, frames)
        retry, dead = [], []
        for tag, status, delay, reason in other:
            if tag == 0:
                self.worker_says(w, status, reason)
            elif status == Status.RETRY:
                retry.append((tag, delay, reason.decode(errors="replace")))
            else:
                dead.append((tag, reason.decode(errors="replace")))
        if w.solo is not None and not self.dispatcher.holds(w.index, w.solo):
            w.solo = None  # the suspect passed (or failed in an ordinary way)
            self.refresh(w)
        self.settle(ack, retry, dead, [])
        if self.want_to_leave and self.recycling is None:
            self.let_one_go()  # a go-ahead refused earlier (its ring was full) is tried again
        if self.backlog or self.suspects:
            self.dispatch_backlog()

    def worker_says(self, w: _Worker, status: int, payload: bytes = b"") -> None:
        """A frame of tag 0: the worker speaks for itself (READY, RETIRE, CLASSIFIED)."""
        if status == Report.CLASSIFIED:
            try:
                measured = wire.parse_classified(payload)
            except wire.ProtocolError as e:
                logger.warning("worker %d sent a measurement that does not parse (%s); ignored", w.index, e)
                return
            self.classified(measured)
            return
        if status == Report.READY:
            w.ready, w.failures = True, 0
            self.refresh(w)
            self.place_cpu_queues()
            self.ready_event.set()
            if self.recycling == w.index:  # its replacement is up: the next may go
                logger.info("worker %d is back", w.index)
                self.recycling = None
                self.let_one_go()
        elif status == Report.RETIRE:
            if w.index not in self.want_to_leave:
                self.want_to_leave.append(w.index)
            self.let_one_go()

    def controller(self, plan: Any) -> Any:
        """The autosize controller of a queue (made from its plan at first use)."""
        from fastq.autosize import Controller

        if plan.name not in self.controllers:
            self.controllers[plan.name] = Controller(plan, user_concurrency=plan.user_concurrency,
                                                     user_prefetch=plan.user_prefetch)
        return self.controllers[plan.name]

    def classified(self, measured: wire.Classified) -> None:
        """A worker measured the "auto" handlers of a queue: the first word per queue counts.
        CPU-bound ones move the queue to the cpu rules (one handler per core it runs on,
        prefetch x 2), unless the user fixed its concurrency; I/O-bound ones stay io."""
        queue, kind, share = measured.queue, measured.kind, measured.share
        if queue not in self.queue_index or queue in self.measured_kinds:
            return
        self.measured_kinds[queue] = kind
        plan = next(q for q in self.plan.queues if q.name == queue)
        if kind != "cpu" or plan.kind == "cpu" or plan.user_concurrency or not self.config.autosize:
            logger.info("autosize: queue %r: its handlers measured %s-bound (on-CPU %.0f%% of their time); "
                        "its numbers stay", queue, "I/O" if kind == "io" else "CPU", share * 100)
            return
        d = self.controller(plan).reclassify("cpu", len(plan.workers))
        concurrency, prefetch = d.concurrency, d.prefetch
        reason = (f"its handlers measured CPU-bound (on-CPU {share:.0%} of their time): now cpu, one handler "
                  f"per core it runs on")
        logger.info("autosize: queue %r: %s; concurrency %d, prefetch %d", queue, reason, concurrency, prefetch)
        self.decisions.append((time.time(), queue, reason))
        self.queue_concurrency[queue] = concurrency
        self.place_cpu_queues()
        if prefetch != self.prefetch[queue]:
            self.prefetch[queue] = prefetch
            self.spawn(self.broker.prefetch(queue, prefetch))
        self.concurrency = self.slots_needed()
        self.tell_slots()
        self.wake[queue].set()

    def settle(self, ack: list[int], retry: list[tuple[int, float, str]],
                     dead: list[tuple[int, str]], release: list[int]) -> None:
        """Hand outcomes to their queues' pumps and return; ``flush_settles`` waits until they
        are applied at the broker."""
        pending = self.pending
        for tag in ack:
            p = pending.pop(tag)
            self.outcome(p, "ack", p.delivery.tag)
        for tag, delay, reason in retry:
            p = pending.pop(tag)
            self.outcome(p, "retry", Retry(p.delivery.tag, delay, reason))
        for tag, reason in dead:
            p = pending.pop(tag)
            logger.warning("dead letter %s on %r: %s", p.delivery.message_id, p.queue, reason)
            self.outcome(p, "dead", (p.delivery.tag, reason))
        for tag in release:
            p = pending.pop(tag)
            self.outcome(p, "release", p.delivery.tag)

    def outcome(self, p: _Pending, kind: str, item: Any) -> None:
        self.outcomes[p.queue][kind].append(item)
        self.wake[p.queue].set()

    def unsettled(self) -> int:
        return sum(len(v) for parts in (*self.outcomes.values(), *self.settling.values()) for v in parts.values())

    async def wait_workers_ready(self, timeout: float | None = None) -> None:
        """Wait until every worker has attached its rings and loaded the app (TimeoutError
        after ``timeout`` seconds)."""
        async def all_ready() -> None:
            while not all(w.ready for w in self.workers):
                self.ready_event.clear()
                await self.ready_event.wait()

        await asyncio.wait_for(all_ready(), timeout)

    async def wait_settled(self, count: int, kind: str = "ack") -> None:
        """Wait until ``count`` messages were settled as ``kind`` ("ack", "retry", "dead",
        "release") at the broker since this supervisor started."""
        while self.settled[kind] < count:
            self.settled_event.clear()
            await self.settled_event.wait()

    async def flush_settles(self) -> None:
        """Wait until every outcome given to ``settle`` is applied at the broker."""
        while self.unsettled() and not all(p.done() for p in self.pumps):
            self.settled_event.clear()
            await self.settled_event.wait()
        if self.unsettled():  # the pumps failed (logged): the broker's leases bring them back
            logger.error("%d outcomes were not settled", self.unsettled())

    # -- life cycle -------------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        now = asyncio.get_running_loop().time()
        if self.signals and signum == self.last_signal[0] and now - self.last_signal[1] < 0.5:
            return  # the same signal twice at once (sent to the pid and to its group): one request
        self.last_signal = (signum, now)
        logger.warning("%s: %s", signal.Signals(signum).name,
                       "stopping at once, giving unfinished work back" if self.signals else
                       f"finishing in-flight work (up to {self.config.shutdown_timeout} s), then exiting")
        self.stop()

    def stop(self) -> None:
        """Stop fetching and drain (as SIGTERM does); called again, give everything back now."""
        self.signals += 1
        self.stopping = True
        self.stopped.set()
        for wake in self.wake.values():  # a pump waiting for new messages stops claiming now
            wake.set()
        if self.signals > 1:
            self.stop_now.set()

    def run_forever(self) -> int:
        """Run until signalled; returns the exit code."""
        return run_loop(self.run())

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.stop_now = asyncio.Event()
        await self.broker.open()
        for q in self.queues:
            await self.broker.declare(q)
            await self.broker.prefetch(q, self.prefetch[q])
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            for w in self.workers:
                self.start_worker(w)
            self.pumps = [self.spawn(self.pump(q)) for q in self.queues]
            if self.config.autosize:
                self.spawn(self.control())
            await self.stopped.wait()  # they stop fetching once stopping, and settle on
            deadline = loop.time() + self.config.shutdown_timeout
            while (self.pending and not self.stop_now.is_set() and loop.time() < deadline
                   and any(w.process is not None and w.process.is_alive() for w in self.workers)):
                await asyncio.sleep(0.02)
        finally:
            self.stopping = True
            for t in list(self.exits):  # no worker starts again from here on
                t.cancel()
            await asyncio.gather(*self.exits, return_exceptions=True)
            await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        for w in self.workers:  # exits from here on are expected
            if w.process is not None:
                loop.remove_reader(w.process.sentinel)
        for w in self.workers:
            if w.process is not None and w.process.is_alive():
                w.inbox.close()  # the worker finishes what it has, writes it back, exits
        deadline = loop.time() + 5.0
        while (any(w.process is not None and w.process.is_alive() for w in self.workers)
               and loop.time() < deadline and not self.stop_now.is_set()):
            await asyncio.sleep(0.02)  # meanwhile the readers apply what the workers write back
        for w in self.workers:
            if w.process is not None and w.process.is_alive():
                w.process.kill()
            if w.process is not None:
                w.process.join()
        for w in self.workers:
            self.end_completions(w)
        if self.pending:
            logger.warning("giving %d unfinished messages back to the broker", len(self.pending))
            self.settle([], [], [], list(self.pending))
        await self.flush_settles()
        for t in list(self.tasks):  # the pumps, and any reader left
            t.cancel()
        for w in self.workers:
            for ring in (w.inbox, w.outbox):
                if ring is not None:
                    ring.close()
                    ring.unlink()
        await self.broker.close()
