"""The parent process: owns the broker, the rings and the workers; its life cycle.

For each queue a pump (fastq.engine.pump) claims while the host's prefetch budget has room; the
supervisor gives each delivery to the live worker with the fewest in flight (the core's
dispatcher), reads completions, and hands the outcomes back to the pumps to settle in batches. A
worker that dies hands its in-flight messages to the others at once and is started again (the
fleet, fastq.engine.fleet). Each of them is a suspect from then on and runs alone on an idle
worker, so that a further death names one message: bystanders pass and are done, and the one that
killed its worker three times is dead-lettered as such. Autosize runs in fastq.engine.tuning.

SIGTERM/SIGINT: stop fetching, let in-flight work finish within ``shutdown_timeout``, settle it,
give the rest back to the broker, exit 0; a second signal gives everything back at once.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import signal
import time
from collections.abc import Coroutine
from typing import Any

import msgspec

from fastq import logs, wire
from fastq._aio import Signal, run_loop
from fastq.autosize import IO_CONCURRENCY_MAX, Plan, plan_app
from fastq.autosize.claims import CoreClaim
from fastq.broker.base import Broker
from fastq.config import Config, Route
from fastq.engine import inspect
from fastq.engine.fleet import MAX_WORKER_DEATHS, DeathPolicy, Fleet, Member
from fastq.engine.placement import Placement
from fastq.engine.pump import Item, Pumps
from fastq.engine.scheduler import Scheduler
from fastq.engine.statistics import SupervisorStatistics, snapshot
from fastq.engine.tuning import Tuning
from fastq.errors import ConfigError, RingClosed, RingFull
from fastq.ring import Dispatcher, RingReader
from fastq.wire import Report, Status, WorkerSpec

logger = logging.getLogger(__name__)

#: seconds the workers get to finish and exit once their input is closed, before SIGKILL
EXIT_GRACE = 5.0
#: seconds between two looks of the watchdog at the workers' process states
WATCHDOG_TICK = 0.5
#: the fleet's rule for messages whose worker died: alone at the first death, dead at the third
DEATHS = DeathPolicy(alone_from=1, counts_every_death=False, give_up_at=MAX_WORKER_DEATHS)


def run_app(
    app: Any, app_spec: str, queues: list[str] | None = None, *, log_level: str = "WARNING"
) -> int:
    """Plan the workers of ``app`` (with ``app.config`` as it stands) and run them until
    SIGTERM/SIGINT; returns the exit code. What ``fastq worker`` and ``App.run`` do.

    Raises:
        ConfigError: a queue has no task or consumer, or the broker URL is bad (said before
            anything starts).
    """
    broker = app.broker  # a bad URL raises here
    routed = sorted(
        h.name
        for h in [*app.tasks.values(), *app.consumers.values()]
        if isinstance(h.publish_to, Route)
    )
    if routed and not broker.has_exchanges:
        raise ConfigError(
            f"{routed[0]} has publish_to=fastq.Route(...), which needs a broker with exchanges "
            f"(amqp://); {broker.url} has queues only: publish_to a queue name"
        )
    keeping = sorted(t.name for t in app.tasks.values() if t.options.result_ttl is not None)
    if keeping:
        try:
            _ = app.result_store
        except ConfigError as e:
            raise ConfigError(f"{keeping[0]} has result_ttl, but {e}") from None
    the_plan = plan_app(app, queues)
    queues = [q.name for q in the_plan.queues]
    logger.info("fastq worker %s on %s", app_spec, broker.url)
    for line in the_plan.explain().splitlines():
        logger.info("plan: %s", line)
    return Supervisor(
        app, app_spec, the_plan, app.config, queues, log_level=log_level
    ).run_forever()


def _cause(gone: Any) -> str:
    """Why a worker is started again: the label of fastq_worker_restarts_total."""
    if gone.before_ready:
        return "failed_start"
    if gone.stopped:
        return "stopped"
    return "recycled" if gone.recycled else "died"


class Supervisor:
    """One host's supervisor of ``queues`` of ``app`` (imported by workers as ``app_spec``)."""

    def __init__(
        self,
        app: Any,
        app_spec: str,
        plan: Plan,
        config: Config,
        queues: list[str],
        log_level: str = "WARNING",
    ) -> None:
        self.app, self.app_spec, self.plan, self.config = app, app_spec, plan, config
        self.queues, self.log_level = queues, log_level
        self.broker: Broker = app.broker
        #: where results are kept when it is not the broker (App(result_store=...))
        self.store: Broker | None = (
            app.result_store if getattr(app, "result_store_url", None) else None
        )
        self.dispatcher = Dispatcher(plan.processes, len(queues))
        self.placement = Placement(plan, queues, self.dispatcher)
        self.pumps = Pumps(
            self.broker,
            config,
            queues,
            {q.name: q.prefetch for q in plan.queues},
            self.deliver,
            self.store,
            publishing=self.publishing_queues(),
            with_headers=self.consumer_queues_with_headers(),
        )
        self.tuning = Tuning(self)
        pinned = plan.pinned or (None,) * plan.processes
        self.fleet = Fleet(
            pinned,
            self.dispatcher,
            self.spec_for,
            ring_bytes=config.ring_size_bytes,
            name="fastq-worker",
        )
        #: items dispatched nowhere yet
        self.backlog: collections.deque[Item] = collections.deque()
        self.stopping = False
        self.place_queues()  # a queue planned with fewer handlers than workers
        self.placement.slots = self.placement.slots_needed()
        self.readers: dict[int, RingReader] = {}
        self.starts = collections.Counter[int]()
        self.ready_event = Signal()  # set at every READY
        self.stopped = asyncio.Event()
        self.stop_now = asyncio.Event()
        self.pump_tasks: list[asyncio.Task[None]] = []
        self.signals = 0
        self.last_signal = (0, 0.0)
        self.exits: set[asyncio.Task[None]] = set()  # workers being replaced
        self.cores = CoreClaim()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.scheduler: Scheduler | None = None
        #: messages each worker finished, and fastq inspect's socket (fastq.engine.inspect)
        self.done = collections.Counter[int]()
        started = time.monotonic()
        self.inspector = inspect.Server(lambda: inspect.report(self, app_spec, started, self.done))
        #: workers started again, by (index, cause): fastq_worker_restarts_total
        self.restarts = collections.Counter[tuple[int, str]]()
        #: /metrics (config.metrics): a missing extra or a bad address is said before any start
        self.metrics: Any = None
        if config.metrics:
            from fastq.metrics import Metrics

            self.metrics = Metrics(config.metrics)

    @property
    def settled_by_queue(self) -> collections.Counter[str]:
        return self.pumps.settled_by_queue

    # -- workers ----------------------------------------------------------------------------

    def spec_for(self, m: Member) -> WorkerSpec:
        slots, per_queue = self.placement.spec_slots(m.index)
        assert m.inbox is not None and m.outbox is not None
        return WorkerSpec(
            index=m.index,
            parent=os.getpid(),
            cpu=m.cpu,
            app=self.app_spec,
            queues=tuple(self.queues),
            input_ring=m.inbox.name,
            output_ring=m.outbox.name,
            concurrency=slots,
            executor="fastq.executors.app:AppExecutor",
            log_level=self.log_level,
            log_format=logs.root_format(),
            max_tasks=self.config.max_tasks_per_child,
            max_memory_bytes=self.config.max_memory_per_child_bytes,
            queue_slots=per_queue,
            io_threads=IO_CONCURRENCY_MAX,
            max_message_bytes=self.config.max_message_bytes,
            metrics=self.metrics is not None,
        )

    def start_worker(self, m: Member) -> None:
        self.fleet.start(m)
        self.starts[m.index] += 1
        asyncio.get_running_loop().add_reader(m.process.sentinel, self.worker_exited, m)
        assert m.outbox is not None
        reader = self.readers[m.index] = RingReader(
            m.outbox, functools.partial(self.completions, m), on_error=self.reader_failed
        )
        reader.start()

    def worker_exited(self, m: Member) -> None:
        asyncio.get_running_loop().remove_reader(m.process.sentinel)
        m.process.join()
        self.dispatcher.set_accepting(m.index, False)
        self.place_queues()
        task = self.spawn(self.replace_worker(m))
        self.exits.add(task)
        task.add_done_callback(self.exits.discard)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
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

    async def replace_worker(self, m: Member) -> None:
        """Apply what the worker finished, hand on what it did not, start another in its place."""
        self.end_completions(m)
        gone = self.fleet.reap(m)
        self.restarts[(m.index, _cause(gone))] += 1
        if gone.before_ready:
            logger.error(
                "worker %d (pid %s) %s; starting it again in %.1f s",
                m.index,
                gone.pid,
                f"was stopped for {self.config.worker_stopped_timeout:g} s or more (SIGSTOP?) "
                "and was killed before it was ready"
                if gone.stopped
                else f"exited with {gone.code} before it was ready (its log says why)",
                gone.restart_in,
            )
            if gone.lost:  # never sent to a worker that is not ready; if it were, it never ran
                self.backlog.extend(self.pumps.pending[t].item for t in gone.lost)
                self.dispatch_backlog()
            if not self.stopping:
                await asyncio.sleep(gone.restart_in)
                if not self.stopping:
                    self.start_worker(m)
            return
        if gone.stopped:
            logger.warning(
                "worker %d (pid %s) was stopped for %g s or more (SIGSTOP?) and was killed; its %d "
                "messages go to the others",
                m.index,
                gone.pid,
                self.config.worker_stopped_timeout,
                len(gone.lost),
            )
        elif gone.recycled:
            logger.info(
                "worker %d (pid %s) recycled; %d unread messages go to the others",
                m.index,
                gone.pid,
                len(gone.lost),
            )
        else:
            logger.warning(
                "worker %d (pid %s) exited with %s holding %d messages; handing them on",
                m.index,
                gone.pid,
                gone.code,
                len(gone.lost),
            )
        again, suspects, dead = self.pumps.lost(
            gone.lost, gone.solo, DEATHS, died=not (gone.recycled or gone.stopped)
        )
        self.backlog.extend(again)
        self.fleet.suspects.extend(suspects)
        if not self.stopping:
            self.start_worker(m)
        self.dispatch_backlog()
        if dead:
            self.pumps.settle(
                dead=[
                    (t, f"killed its worker {MAX_WORKER_DEATHS} times (last exit code {gone.code})")
                    for t in dead
                ]
            )

    def end_completions(self, m: Member) -> None:
        """Apply every completion a worker that has exited wrote, then stop its reader.

        The completions still count, so that nothing done is redone.
        """
        reader = self.readers.pop(m.index, None)
        if reader is None:
            return
        reader.drain()
        reader.stop()

    def let_one_go(self) -> None:
        """Grant the next recycle, if none is under way: the worker gets no more work, then the
        go-ahead frame behind everything it already has."""
        if self.stopping:
            return
        fleet = self.fleet
        index = fleet.recycling.grant(lambda i: fleet[i].ready and fleet[i].alive)
        if index is None:
            return
        m = fleet[index]
        fleet.leave(m)
        self.place_queues()
        logger.info("worker %d may recycle now", m.index)
        try:
            assert m.inbox is not None
            m.inbox.put_nowait(wire.recycle_frame())
        except (RingFull, RingClosed):
            fleet.stay(m)  # try again at its next request
            fleet.recycling.refused(m.index)
            self.place_queues()

    # -- dispatch ---------------------------------------------------------------------------

    def deliver(self, items: list[Item]) -> None:
        """A pump's new deliveries."""
        self.backlog.extend(items)
        self.dispatch_backlog()

    def dispatch_backlog(self) -> None:
        fleet = self.fleet
        if fleet.suspects or fleet.reserved is not None:
            fleet.place_suspects(self.may_run, self.send_alone)
        if self.backlog:
            left = self.dispatcher.dispatch(self.backlog)
            self.backlog.clear()
            self.backlog.extend(left)

    def may_run(self, tag: int, worker: int) -> bool:
        return self.placement.may_run(self.pumps.pending[tag].queue, worker)

    def send_alone(self, m: Member, tag: int) -> bool:
        return not self.dispatcher.dispatch_to(m.index, [self.pumps.pending[tag].item])

    def place_queues(self) -> None:
        """Place the queues again (a concurrency, a share or a worker's state changed); what
        waited for a worker that is not there goes elsewhere."""
        fleet = self.fleet
        if self.placement.place_queues(self.tuning.kind, lambda i: fleet[i].usable):
            self.retell()
            if self.backlog:
                self.dispatch_backlog()

    def retell(self) -> None:
        """Tell each live worker its handler slots where they changed."""
        self.placement.tell(self.fleet)

    # -- completions ------------------------------------------------------------------------

    def completions(self, m: Member, frames: list[bytes]) -> None:
        ack, other = self.dispatcher.complete(m.index, frames)
        retry, dead, returned = [], [], []
        for tag, status, delay, payload in other:
            if tag == 0:
                self.worker_says(m, status, payload)
            elif status == Status.RETRY:
                retry.append((tag, delay, payload.decode(errors="replace")))
            elif status == Status.VALUE or status == Status.FAILED:
                try:
                    returned.append((tag, wire.parse_returned(payload)))
                except wire.ProtocolError as e:  # the worker runs another version: never lost
                    logger.error("worker %d: %s; message retried", m.index, e)
                    retry.append((tag, 1.0, str(e)))
            else:
                dead.append((tag, payload.decode(errors="replace")))
        self.fleet.passed(m)
        self.done[m.index] += len(ack) + len(retry) + len(dead) + len(returned)
        self.pumps.settle(ack, retry, dead, returned=returned)
        if self.fleet.recycling.asked and self.fleet.recycling.leaving is None:
            self.let_one_go()  # a go-ahead refused earlier (its ring was full) is tried again
        if self.backlog or self.fleet.suspects:
            self.dispatch_backlog()

    def worker_says(self, m: Member, status: int, payload: bytes = b"") -> None:
        """A report (tag 0): the worker speaks for itself (READY, RETIRE, CLASSIFIED, TALLY)."""
        if status == Report.TALLY:
            if self.metrics is not None:
                self.metrics.tally(m.index, payload)
        elif status == Report.CLASSIFIED:
            try:
                measured = wire.parse_classified(payload)
            except wire.ProtocolError as e:
                logger.warning(
                    "worker %d sent a measurement that does not parse (%s); ignored", m.index, e
                )
                return
            self.tuning.classified(measured)
        elif status == Report.READY:
            self.fleet.became_ready(m)
            self.place_queues()
            # it started with the plan's slots: tell it what tuning decided meanwhile (a backlog
            # met at the start is sized before the workers are up)
            self.placement.told.pop(m.index, None)
            self.retell()
            self.ready_event.set()
            if self.fleet.recycling.back(m.index):  # its replacement is up: the next may go
                logger.info("worker %d is back", m.index)
                self.let_one_go()
        elif status == Report.RETIRE:
            self.fleet.recycling.ask(m.index)
            self.let_one_go()

    # -- what it says of itself -------------------------------------------------------------

    def statistics(self) -> SupervisorStatistics:
        """Per queue: concurrency, prefetch, in flight and settled; per worker: its pid, core,
        messages in flight and starts; and the controller's recent decisions with their
        reasons."""
        return snapshot(
            self.queues, self.pumps, self.placement, self.fleet, self.starts, self.tuning.decisions
        )

    async def wait_workers_ready(self, timeout: float | None = None) -> None:
        """Wait until every worker has attached its rings and loaded the app (TimeoutError
        after ``timeout`` seconds)."""

        async def all_ready() -> None:
            while not all(m.ready for m in self.fleet):
                self.ready_event.clear()
                await self.ready_event.wait()

        await asyncio.wait_for(all_ready(), timeout)

    async def wait_settled(self, count: int, kind: str = "ack") -> None:
        """Wait until ``count`` messages were settled as ``kind`` ("ack", "retry", "dead",
        "release") at the broker since this supervisor started."""
        await self.pumps.wait_settled(count, kind)

    # -- life cycle -------------------------------------------------------------------------

    def on_signal(self, signum: int) -> None:
        now = asyncio.get_running_loop().time()
        if self.signals and signum == self.last_signal[0] and now - self.last_signal[1] < 0.5:
            return  # the same signal twice at once (sent to the pid and to its group): one request
        self.last_signal = (signum, now)
        logger.warning(
            "%s: %s",
            signal.Signals(signum).name,
            "stopping at once, giving unfinished work back"
            if self.signals
            else f"finishing in-flight work (up to {self.config.shutdown_timeout} s), then exiting",
        )
        self.stop()

    def stop(self) -> None:
        """Stop fetching and drain (as SIGTERM does); called again, give everything back now."""
        self.signals += 1
        self.stopping = True
        self.stopped.set()
        self.pumps.stop()  # a pump waiting for new messages stops claiming now
        if self.signals > 1:
            self.stop_now.set()

    async def watchdog(self) -> None:
        """Kill a worker stopped (SIGSTOP) for ``worker_stopped_timeout`` seconds: its exit hands
        what it held to the others, and it is started again."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            await asyncio.sleep(WATCHDOG_TICK)
            self.fleet.kill_stopped(self.config.worker_stopped_timeout, loop.time())

    def claim_cores(self) -> None:
        """Pin to the cores the other fastq processes of this host use least (fastq.autosize
        .claims), when this host runs fewer worker processes than it has cores."""
        if not self.plan.pinned:
            return
        chosen = self.cores.take(len(self.plan.pinned), self.plan.topology.cpus)
        self.plan = msgspec.structs.replace(self.plan, pinned=chosen)
        for m, cpu in zip(self.fleet, chosen, strict=True):
            m.cpu = cpu

    def publish_targets(self) -> list[tuple[str, Any]]:
        """``(queue, publish_to)`` of each handler of this supervisor's queues that publishes
        what it returns."""
        handlers = [*self.app.tasks.values(), *self.app.consumers.values()]
        return [
            (h.queue, target)
            for h in handlers
            if h.queue in self.queues and (target := getattr(h, "publish_to", None)) is not None
        ]

    def consumer_queues_with_headers(self) -> set[str]:
        """This supervisor's consumer queues whose deliveries reach the workers with their
        broker headers: where the app has middleware that sees messages (a foreign producer's
        trace context, say); otherwise nothing is paid for them."""
        hooks = getattr(self.app, "hooks", None)
        if hooks is None or not (hooks.before or hooks.after):
            return set()
        return {q for q in self.queues if q in getattr(self.app, "consumers", {})}

    def publishing_queues(self) -> set[str]:
        """This supervisor's queues whose handlers publish: what they return (publish_to), or
        the steps that a workflow step's outcome makes ready (on a broker without transactions,
        each confirmed before the step's ack, as an output is)."""
        workflows = getattr(self.app, "workflows", {}).values()
        steps = {step.task.queue for wf in workflows for step in wf.steps.values()}
        return {queue for queue, _ in self.publish_targets()} | (steps & set(self.queues))

    def output_queues(self) -> list[str]:
        """The queues that the handlers of this supervisor's queues publish to, beside its own."""
        found = {
            target if isinstance(target, str) else target.queue
            for _, target in self.publish_targets()
            if not isinstance(target, Route)
        }
        return sorted(found - set(self.queues))

    def output_routes(self) -> list[Route]:
        """The exchanges that the handlers of this supervisor's queues publish to."""
        return [t for _, t in self.publish_targets() if isinstance(t, Route)]

    def run_forever(self) -> int:
        """Run until signalled; returns the exit code."""
        return run_loop(self.run())

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        await self.broker.open()
        if self.store is not None:
            await self.store.open()
        for q in self.queues:
            await self.broker.declare(q)
            await self.broker.prefetch(q, self.pumps.qos(q))
        for q in self.output_queues():  # a publish_to queue nobody consumes yet holds them
            await self.broker.declare(q)
        for route in self.output_routes():  # refused at start when it exists as another kind
            await self.broker.declare_exchange(route.exchange, route.exchange_kind)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.on_signal, sig)
        await self.inspector.start()
        if self.metrics is not None:
            self.metrics.start()
            self.spawn(self.metrics.run(self))
        try:
            self.claim_cores()
            self.fleet.sweep()
            for m in self.fleet:
                self.start_worker(m)
            self.pump_tasks = [self.spawn(self.pumps.run(q)) for q in self.queues]
            self.spawn(self.watchdog())
            if getattr(self.app, "schedules", None):
                self.scheduler = Scheduler(self.app, self.broker)
                self.spawn(self.scheduler.run(self.stopped))
            if self.config.autosize:
                self.spawn(self.tuning.run())
            if self.pumps.outbox is not None:  # what nobody published of the store's outbox
                self.spawn(self.pumps.outbox.run())
            await self.stopped.wait()  # they stop fetching once stopping, and settle on
            deadline = loop.time() + self.config.shutdown_timeout
            while (
                self.pumps.pending
                and not self.stop_now.is_set()
                and loop.time() < deadline
                and any(m.alive for m in self.fleet)
            ):
                await asyncio.sleep(0.02)
        finally:
            self.stopping = True
            self.pumps.stop()
            for t in list(self.exits):  # no worker starts again from here on
                t.cancel()
            await asyncio.gather(*self.exits, return_exceptions=True)
            await self.shutdown()
        return 0

    async def shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        fleet = self.fleet
        for m in fleet:  # exits from here on are expected
            if m.process is not None:
                loop.remove_reader(m.process.sentinel)
        fleet.close_inputs()  # each worker finishes what it has, writes it back, exits
        deadline = loop.time() + EXIT_GRACE
        while any(m.alive for m in fleet) and loop.time() < deadline and not self.stop_now.is_set():
            await asyncio.sleep(0.02)  # meanwhile the readers apply what the workers write back
        fleet.kill_remaining()
        for m in fleet:
            self.end_completions(m)
        if self.pumps.pending:
            logger.warning(
                "giving %d unfinished messages back to the broker", len(self.pumps.pending)
            )
            self.pumps.settle(release=list(self.pumps.pending))
        await self.pumps.flush(self.pump_tasks)
        for t in list(self.tasks):  # the pumps, and any reader left
            t.cancel()
        fleet.release_all()
        self.cores.release()
        await self.inspector.close()
        await self.broker.close()
        if self.store is not None:
            await self.store.close()
        if self.metrics is not None:
            self.metrics.stop()
