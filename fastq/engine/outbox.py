"""The supervisor's sweep of a result store's workflow outbox (RabbitMQ with a sqlite:// or
postgresql:// result store): what nobody published goes out from here.

A message enters the outbox in the transaction that makes its step ready, and leaves it once
RabbitMQ confirmed it: the supervisor's own pump publishes what a step's outcome made ready,
the relay of the process that called ``wf.start`` or ``wf.resume`` what those made
(``fastq.workflow.relay``). A process killed between its transaction and its publish leaves
its rows there. The pump publishes what it finds at its start; this sweep looks again every
``SWEEP_EVERY`` seconds and publishes the rows it saw at its look before too (so at least that
old: a live process publishes its own in milliseconds), except those this supervisor's pump is
publishing itself. A row that another live process is still trying to publish (RabbitMQ
unreachable for longer than that) may so go twice: at least once, and a step bears a duplicate
(the first completion wins).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection

from fastq.broker.base import Broker

logger = logging.getLogger(__name__)

SWEEP_EVERY = 5.0


class OutboxSweep:
    """Publishes ``store``'s outbox rows seen at two looks in a row to ``broker``, then lets
    them go; ``publishing()`` names the rows this supervisor's pump has in hand."""

    def __init__(
        self, broker: Broker, store: Broker, publishing: Callable[[], Collection[int]]
    ) -> None:
        self.broker, self.store, self.publishing = broker, store, publishing
        self.seen: set[int] = set()
        self.published = 0

    async def run(self, every: float = SWEEP_EVERY) -> None:
        """Sweep every ``every`` seconds until cancelled (a failed sweep is logged; the next
        one tries again)."""
        while True:
            await asyncio.sleep(every)
            try:
                await self.sweep()
            except Exception as e:  # noqa: BLE001 - the rows stay; the next sweep tries again
                logger.warning("sweeping the workflow outbox of %s failed: %s", self.store.url, e)

    async def sweep(self) -> int:
        """One look: publish and let go what the last look saw too; how many."""
        pending = await self.store.pending_outbox()
        busy = self.publishing()
        stale = [(i, o) for i, o in pending if i in self.seen and i not in busy]
        self.seen = {i for i, _ in pending} - {i for i, _ in stale}
        if not stale:
            return 0
        logger.warning(
            "publishing %d workflow step message(s) left in the outbox of %s by a process that "
            "ended before it published them",
            len(stale),
            self.store.url,
        )
        await self.broker.publish_outputs([o for _, o in stale])
        await self.store.outbox_done([i for i, _ in stale])
        self.published += len(stale)
        return len(stale)
