"""The periodic scheduler every supervisor runs (``@app.periodic``): at each tick of each
schedule it asks the broker to enqueue that tick once (``Broker.publish_tick``).

SQL brokers and memory:// make each tick exactly-once by themselves (a schedule's row moves
forward in the enqueue's transaction), so every supervisor publishes and all but one are told
"done already". RabbitMQ elects one leader per App (``Broker.lead``, a single-active-consumer
queue): only the process ``leading`` publishes, and a new leader reads the last tick its
predecessor recorded (``Broker.last_tick``). The ticks and what counts as missed are
``fastq.schedule``'s pure math.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastq.broker.base import Broker
from fastq.schedule import Schedule, due

logger = logging.getLogger(__name__)

#: seconds between two looks of a supervisor that does not lead (RabbitMQ): a new leader's
#: first look comes at most this late after the handover
FOLLOWER_LOOK = 0.5
#: seconds before a scheduler tries again after the broker failed it
RETRY_AFTER = 1.0


class Scheduler:
    """The schedules of ``app`` (its ``schedules``: task name -> Schedule), on ``broker``."""

    def __init__(self, app: Any, broker: Broker) -> None:
        self.app, self.broker = app, broker
        self.schedules: list[Schedule] = list(app.schedules.values())
        #: the election's name: one leader per App name (RabbitMQ)
        self.group = f"fastq.schedule.{app.name}"
        self.started = time.time()
        #: schedule name -> the latest tick enqueued, as far as this process knows
        self.last: dict[str, float | None] = {}
        self.leads = False
        #: ticks this process enqueued (what its statistics and the tests read)
        self.enqueued = 0
        #: schedules whose tick message could not be made (logged whole once, then a line)
        self.failing: set[str] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop`` is set; a broker error is logged and tried again."""
        if not self.schedules:
            return
        while not await self.join():
            try:
                await asyncio.wait_for(stop.wait(), RETRY_AFTER)
                return
            except TimeoutError:
                pass
        logger.info(
            "scheduler: started at %.3f with %d schedule(s)", self.started, len(self.schedules)
        )
        while not stop.is_set():
            try:
                wait = await self.look(time.time())
            except Exception as e:  # noqa: BLE001 - the broker is down: the next look tries again
                logger.warning("scheduler: enqueueing ticks failed (%s); trying again", e)
                self.leads = False  # read the last ticks again: another may have gone on
                wait = RETRY_AFTER
            try:
                await asyncio.wait_for(stop.wait(), max(wait, 0.001))
            except TimeoutError:
                pass

    async def join(self) -> bool:
        """Declare the periodic tasks' queues and join the election; False while the broker
        is unreachable (the caller tries again)."""
        try:
            for q in sorted({self.app.tasks[s.name].queue for s in self.schedules}):
                await self.broker.declare(q)
            await self.broker.lead(self.group)
        except Exception as e:  # noqa: BLE001 - the broker is down: try again, never stop
            logger.warning("scheduler: joining %s failed (%s); trying again", self.group, e)
            return False
        return True

    async def look(self, now: float) -> float:
        """Enqueue what is due at ``now``; the seconds until the next look."""
        if not self.broker.leading(self.group):
            self.leads = False
            return FOLLOWER_LOOK
        if not self.leads:  # (again) the one that publishes: start from what the broker says
            for s in self.schedules:
                self.last[s.name] = await self.broker.last_tick(s.name)
            self.leads = True
        for s in self.schedules:
            for tick in due(s, self.last.get(s.name), now, self.started):
                task = self.app.tasks[s.name]
                try:
                    tick_message = task.tick_message(s, tick)
                except Exception as e:  # a before_send hook raised: this schedule waits
                    if s.name in self.failing:
                        logger.warning("scheduler: %s's tick %.3f still fails: %r", s.name, tick, e)
                    else:
                        self.failing.add(s.name)
                        logger.exception(
                            "scheduler: making %s's message for tick %.3f failed (its "
                            "before_send hooks?); that tick is tried again at the next look",
                            s.name,
                            tick,
                        )
                    break
                self.failing.discard(s.name)
                if await self.broker.publish_tick(s.name, tick, task.queue, tick_message):
                    self.enqueued += 1
                    logger.info("scheduler: enqueued %s for tick %.3f", s.name, tick)
                self.last[s.name] = tick
        after = time.time()
        return min(s.next_after(after) for s in self.schedules) - after
