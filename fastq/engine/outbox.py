"""The supervisor's side of a result store's workflow outbox (RabbitMQ with a sqlite:// or
postgresql:// result store; ``fastq.workflow``).

A message enters the outbox in the transaction that makes its step ready, and leaves it once
RabbitMQ confirmed it. The supervisor's pumps record a batch of steps' outcomes (``record``),
publish what they made ready with their other outputs, confirmed, then ack the steps and let
those rows go (``published``). What the process that called ``wf.start`` or ``wf.resume`` put
there its relay publishes (``fastq.workflow.relay``).

A process killed between its transaction and its publish leaves its rows there (a supervisor
killed after its publish, before they were let go, too: they go again, as duplicates). ``run``
looks at the outbox when the supervisor starts and then every ``SWEEP_EVERY`` seconds, and
publishes the rows it saw at its look before too (so at least that old: a live process
publishes its own in milliseconds), except those this supervisor has in hand. So a supervisor
that starts while a producer's relay is busy does not publish that relay's rows again; a row
that another live process is still trying to publish (RabbitMQ unreachable for longer than
that) may go twice: at least once, and a step bears a duplicate (the first completion wins).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from fastq.broker.base import Broker, Output, StoredResult

logger = logging.getLogger(__name__)

SWEEP_EVERY = 2.0


class StoreOutbox:
    """The outbox of ``store`` (which keeps the runs) for ``broker`` (which keeps none)."""

    def __init__(self, broker: Broker, store: Broker) -> None:
        self.broker, self.store = broker, store
        #: made ready by a batch this supervisor recorded, not yet published: message id -> row
        self.in_hand: dict[str, int] = {}
        self.seen: set[int] = set()  # the rows at the sweep's last look

    async def record(self, steps: Sequence[StoredResult]) -> list[Output]:
        """Record ``steps``' outcomes in one store transaction; the messages they made ready,
        to publish before the ack."""
        made = await self.store.record_steps(steps)
        for row, o in made:
            self.in_hand[o.message.message_id] = row
        return [o for _, o in made]

    async def published(self, outputs: Sequence[Output]) -> None:
        """``outputs`` were published, confirmed (and their steps acked): those from the outbox
        leave it (a failure is logged: they go again from there, as duplicates)."""
        rows = [self.in_hand.pop(o.message.message_id, 0) for o in outputs]
        if any(rows):
            try:
                await self.store.outbox_done([i for i in rows if i])
            except Exception as e:  # noqa: BLE001 - published: only the outbox keeps them
                logger.warning("letting published rows go from the workflow outbox failed: %s", e)

    async def run(self) -> None:
        """Sweep now, then every SWEEP_EVERY seconds, until cancelled (a failed sweep is
        logged; the next one tries again)."""
        while True:
            try:
                await self.sweep()
            except Exception as e:  # noqa: BLE001 - the rows stay; the next sweep tries again
                logger.warning("sweeping the workflow outbox of %s failed: %s", self.store.url, e)
            await asyncio.sleep(SWEEP_EVERY)

    async def sweep(self) -> int:
        """One look: publish and let go what the last look saw too and this supervisor does
        not have in hand; how many."""
        pending = await self.store.pending_outbox()
        busy = set(self.in_hand.values())
        stale = [(i, o) for i, o in pending if i in self.seen and i not in busy]
        self.seen = {i for i, _ in pending} - {i for i, _ in stale}
        if not stale:
            return 0
        logger.warning(
            "publishing %d workflow step message(s) left in the outbox of %s by a process that "
            "ended before it published them (or has not published them for %g s)",
            len(stale),
            self.store.url,
            SWEEP_EVERY,
        )
        await self.broker.publish_outputs([o for _, o in stale])
        await self.store.outbox_done([i for i, _ in stale])
        return len(stale)
