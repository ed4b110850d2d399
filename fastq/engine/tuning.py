"""The supervisor's autosize loop: samples -> controllers -> apply.

Every LOOK_TICK seconds it reads the settled counts and the cores; each queue's controller looks
when its own interval has passed (``Controller.next_look``: 2 s, 1 s at the start and after an
increase; ``Cadence``: FIRST_LOOK after the start and after work reaches a queue that had none),
judged on its own window without the settling start. At each look it shares the host
among the busy queues, lets the due controllers decide, and applies what changed: prefetch at
once (at the broker), concurrency by telling each worker its slots, a CPU queue's share also by
the workers it runs on. The decisions are pure (fastq.autosize); this module measures and
applies.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Coroutine, Iterable
from typing import Any, Protocol

from fastq.autosize import (
    CONTROL_INTERVAL,
    LOOK_TICK,
    PRESS_MEMORY,
    Cadence,
    Controller,
    Decision,
    LoadMeter,
    Plan,
    QueuePlan,
    Sample,
    settle_for,
    share_slots,
    steady_rate,
)
from fastq.broker.base import Broker
from fastq.config import Config
from fastq.engine.placement import Placement
from fastq.engine.pump import Pumps
from fastq.wire import Classified

logger = logging.getLogger(__name__)

#: the controller's recent decisions kept for statistics
DECISIONS_KEPT = 100


class Engine(Protocol):
    """What the loop reads and moves (the supervisor)."""

    plan: Plan
    config: Config
    broker: Broker
    pumps: Pumps
    placement: Placement
    stopping: bool

    def place_queues(self) -> None: ...

    def retell(self) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...


class Tuning:
    """The controllers of one supervisor's queues, and the loop that runs them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.plans = {q.name: q for q in engine.plan.queues}
        #: per queue, its controller (made at first use)
        self.controllers: dict[str, Controller] = {}
        #: what each queue's "auto" handlers measured as (the first word counts)
        self.measured_kinds: dict[str, str] = {}
        #: the recent changes: (unix time, queue, reason), newest last
        self.decisions: collections.deque[tuple[float, str, str]] = collections.deque(
            maxlen=DECISIONS_KEPT
        )
        #: every change since the start, by (queue, rule): fastq_autosize_decisions_total
        self.rules = collections.Counter[tuple[str, str]]()

    def kind(self, queue: str) -> str:
        """The kind a queue's numbers follow now: its controller's, else its plan's."""
        controller = self.controllers.get(queue)
        return controller.kind if controller is not None else self.plans[queue].kind

    def controller(self, plan: QueuePlan) -> Controller:
        """The autosize controller of a queue (made from its plan at first use)."""
        if plan.name not in self.controllers:
            self.controllers[plan.name] = Controller(
                plan,
                user_concurrency=plan.user_concurrency,
                user_prefetch=plan.user_prefetch,
                concurrency_max=self.engine.config.io_concurrency_ceiling,
                shallow=self.engine.broker.unsettled_costs,
            )
        return self.controllers[plan.name]

    def decided(self, queue: str, reason: str, d: Decision) -> None:
        logger.info(
            "autosize: queue %r: %s; concurrency %d, prefetch %d",
            queue,
            reason,
            d.concurrency,
            d.prefetch,
        )
        self.decisions.append((time.time(), queue, reason))
        self.rules[(queue, d.rule or "other")] += 1

    async def run(self) -> None:
        """The loop (see the module docstring), until the engine stops."""
        e = self.engine
        pumps, placement = e.pumps, e.placement
        meter = LoadMeter(e.plan.topology, e.plan.pinned)
        controllers = self.controllers
        for q in e.plan.queues:  # a queue reclassified before this started keeps its controller
            if q.name in placement.queue_index:
                self.controller(q)
        loop = asyncio.get_running_loop()
        #: per queue: when it last looked, and how long until its next look
        cadence = Cadence()
        due = cadence.due
        # when each queue last had work waiting at the broker at two reads in a row (one read
        # may catch a queue that keeps up between a publish and its pump's next round trip)
        waited: dict[str, float] = {}
        ready_before: dict[str, int] = {}
        history: collections.deque[tuple[float, collections.Counter[str], tuple[float, float]]]
        history = collections.deque()
        await self.start(controllers)
        while not e.stopping:
            await asyncio.sleep(LOOK_TICK)
            now = loop.time()
            history.append((now, collections.Counter(pumps.settled_by_queue), meter.snapshot()))
            while history[0][0] < now - 2 * CONTROL_INTERVAL:
                history.popleft()
            # the start, and work reaching a queue that had none, are changes of load: a look
            # comes FIRST_LOOK after them
            looking = cadence.tick(now, controllers, pumps.in_flight)
            if not looking:
                continue
            headroom = meter.memory_headroom()
            backlogs = await self.backlogs(controllers)
            for name in controllers:
                if name not in backlogs:  # the broker is down: decide next time
                    due[name] = (now, CONTROL_INTERVAL)
                if backlogs.get(name, 0) > 0 and ready_before.get(name, 0) > 0:
                    waited[name] = now
                ready_before[name] = backlogs.get(name, 0)
                if name in looking and name in backlogs:
                    cadence.saw(name, backlog=backlogs[name], in_flight=pumps.in_flight[name])
            # Queues with work (demand) share the host by weight: I/O ones its handlers, CPU ones
            # its cores, weighed against the busy queues that press for them (work waiting)
            decided: list[str] = []
            shared = {n: c for n, c in controllers.items() if not c.user_fixed}
            caps = share_slots(
                {n: self.plans[n].options.weight for n in shared},
                {n: backlogs.get(n, 0) > 0 or pumps.in_flight[n] > 0 for n in shared},
                budget=e.config.io_concurrency_ceiling,
                floors={n: c.min_concurrency for n, c in shared.items() if c.kind == "io"},
                cores={n: c.cpu_cores for n, c in shared.items() if c.kind == "cpu"},
                pressing={n for n in shared if now - waited.get(n, -PRESS_MEMORY) < PRESS_MEMORY},
            )
            for name, controller in list(controllers.items()):
                if name not in backlogs:
                    continue
                d = controller.cap(caps[name]) if name in caps else None
                if (
                    d is not None and d.reason
                ):  # its share moved: judge what follows at the usual pace
                    due[name] = (now, CONTROL_INTERVAL)
                    decided.append(name)
                elif name in looking:
                    at, wait = due[name]
                    start = at + settle_for(wait) + LOOK_TICK / 2
                    first = max((i for i, h in enumerate(history) if h[0] <= start), default=0)
                    window = list(itertools.islice(history, first, None))
                    if (
                        len(window) < 2
                        or window[-1][0] - window[0][0] < (wait - settle_for(wait)) / 2
                    ):
                        # too little of its window was read (the awaits took long): next tick
                        continue
                    throughput = steady_rate(
                        [t for t, _, _ in window], [c[name] for _, c, _ in window]
                    )
                    busy = meter.busy_between(window[0][2], window[-1][2])
                    latency = pumps.in_flight[name] / throughput if throughput > 0 else wait
                    d = controller.step(
                        Sample(
                            busy=busy,
                            backlog=backlogs[name],
                            throughput=throughput,
                            latency=latency,
                            in_flight=pumps.in_flight[name],
                            memory_headroom=headroom,
                        )
                    )
                    due[name] = (now, controller.next_look(latency))
                    decided.append(name)
                if d is not None and d.reason:
                    await self.apply(name, controller, d)
            stamp = loop.time()  # after the awaits above: the next window starts here
            for name in decided:
                due[name] = (stamp, due[name][1])
            e.retell()

    async def backlogs(self, names: Iterable[str]) -> dict[str, int]:
        """Messages waiting, per queue: ready at the broker, and delivered to this host but not
        handed on yet (RabbitMQ pushes a publishing queue's confirm allowance ahead: a backlog
        it no longer counts as ready); a queue whose depth could not be read (the broker is
        down) is left out, and said so."""
        broker = self.engine.broker
        backlogs: dict[str, int] = {}
        for name in names:
            try:
                backlogs[name] = (await broker.queue_depth(name)).ready + broker.buffered(name)
            except Exception as exc:  # noqa: BLE001 - whatever it was: decide next time
                logger.warning("autosize: no queue depth for %r (%s); holding", name, exc)
        return backlogs

    async def start(self, controllers: dict[str, Controller]) -> None:
        """Before the first look, while the workers start: an I/O queue whose backlog the
        formula's prefetch cannot hold is sized by it at once (``Controller.start``), within
        its share of the host's handlers among the I/O queues with a backlog."""
        e = self.engine
        backlogs = await self.backlogs(controllers)
        io = {
            n: c
            for n, c in controllers.items()
            if c.kind == "io" and not c.user_fixed and n in backlogs
        }  # CPU queues share the cores by the looks' readings (who presses for them)
        caps = share_slots(
            {n: self.plans[n].options.weight for n in io},
            {n: backlogs[n] > 0 for n in io},
            budget=e.config.io_concurrency_ceiling,
            floors={n: c.min_concurrency for n, c in io.items()},
        )
        for name, controller in io.items():
            d = controller.cap(caps[name])
            if d.reason:
                await self.apply(name, controller, d)
            d = controller.start(backlogs[name])
            if d.reason:
                await self.apply(name, controller, d)
        e.retell()

    async def apply(self, name: str, controller: Controller, d: Decision) -> None:
        """A decision: the queue's concurrency (before any await: ``classified`` may run
        meanwhile), the workers it runs on, its prefetch at the broker."""
        e = self.engine
        self.decided(name, d.reason, d)
        e.placement.concurrency[name] = d.concurrency
        e.place_queues()
        e.pumps.wake[name].set()
        if d.prefetch != e.pumps.prefetch[name]:
            e.pumps.prefetch[name] = d.prefetch
            try:
                await e.broker.prefetch(name, e.pumps.qos(name))
            except Exception as exc:  # noqa: BLE001 - the broker is down: its reconnect applies it
                logger.warning(
                    "autosize: prefetch %d for %r not applied at the broker yet (%s)",
                    d.prefetch,
                    name,
                    exc,
                )

    def classified(self, measured: Classified) -> None:
        """A worker measured the "auto" handlers of a queue: the first word per queue counts.
        CPU-bound ones move the queue to the cpu rules (one handler per core it runs on,
        prefetch x 2), unless the user fixed its concurrency; I/O-bound ones stay io."""
        e = self.engine
        queue, kind, share = measured.queue, measured.kind, measured.share
        if queue not in e.placement.queue_index or queue in self.measured_kinds:
            return
        self.measured_kinds[queue] = kind
        plan = self.plans[queue]
        if kind != "cpu" or plan.kind == "cpu" or plan.user_concurrency or not e.config.autosize:
            logger.info(
                "autosize: queue %r: its handlers measured %s-bound (on-CPU %.0f%% of their "
                "time); its numbers stay",
                queue,
                "I/O" if kind == "io" else "CPU",
                share * 100,
            )
            return
        d = self.controller(plan).reclassify("cpu", len(plan.workers))
        self.decided(
            queue,
            f"its handlers measured CPU-bound (on-CPU {share:.0%} of their time): "
            "now cpu, one handler per core it runs on",
            d,
        )
        e.placement.concurrency[queue] = d.concurrency
        e.place_queues()
        if d.prefetch != e.pumps.prefetch[queue]:
            e.pumps.prefetch[queue] = d.prefetch
            e.spawn(e.broker.prefetch(queue, e.pumps.qos(queue)))
        e.retell()
        e.pumps.wake[queue].set()
