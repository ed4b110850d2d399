"""The PostgreSQL broker for callers without an event loop (``task.send()``, ``task.result()``,
the CLI): a thread with a loop and a small pool of its own, and the reads and admin writes that
go through it. Imports no driver: ``fastq.broker.postgres`` hands it its pool factory."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastq import results
from fastq.broker.base import DeadLetter
from fastq.broker.postgres_sql import Statements

T = TypeVar("T")

logger = logging.getLogger(__name__)


class AnyThread:
    """The PostgreSQL broker's methods that any thread may call, through its ``bridge()``."""

    sql: Statements

    def bridge(self) -> Bridge:
        raise NotImplementedError

    def get_result(self, message_id: str) -> bytes | None:
        row = self.bridge().run(
            lambda c: c.fetchrow(self.sql.get_result, message_id), "the result was not read"
        )
        if row is None:
            return None
        return results.unexpired(message_id, *row)

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, oldest first, with the reason each one failed."""
        rows = self.bridge().run(
            lambda c: c.fetch(self.sql.dead_letters, queue, limit), "dead letters were not read"
        )
        return [DeadLetter.from_row(r) for r in rows]

    def requeue_dead_letters(
        self, ids: Sequence[int] | None = None, *, queue: str | None = None
    ) -> int:
        """Put dead letters (all, those of ``queue``, or those ``ids``) back, with fresh counts."""
        wanted = None if ids is None else [int(i) for i in ids]
        moved: int = self.bridge().run(
            lambda c: c.fetchval(self.sql.requeue, queue, wanted), "nothing was requeued"
        )
        return moved

    def dead_letter(self, id: int | str, *, queues: Sequence[str] = ()) -> DeadLetter | None:
        row = self.bridge().run(
            lambda c: c.fetchrow(self.sql.dead_letter, int(id)), "the dead letter was not read"
        )
        return None if row is None else DeadLetter.from_row(row)

    def purge(self, queue: str) -> int:
        status: str = self.bridge().run(
            lambda c: c.execute(self.sql.purge, queue), "nothing was purged"
        )
        return int(status.rpartition(" ")[2])

    def purge_dead_letters(self, queue: str) -> int:
        status: str = self.bridge().run(
            lambda c: c.execute(self.sql.purge_dead, queue), "nothing was purged"
        )
        return int(status.rpartition(" ")[2])


class Bridge:
    """A thread with an event loop and a small pool of its own, for callers without a loop
    (``task.send()``, ``task.result()``, the CLI): any thread may call ``run``."""

    def __init__(
        self,
        make_pool: Callable[[], Awaitable[Any]],
        translate: Callable[[BaseException, str], BaseException],
        errors: tuple[type[BaseException], ...],
    ) -> None:
        #: makes the pool (and the schema, if need be) on the bridge's loop
        self.make_pool, self.translate, self.errors = make_pool, translate, errors
        self.loop = asyncio.new_event_loop()
        self.pool: Any = None
        self.thread = threading.Thread(
            target=self.loop.run_forever, name="fastq-pg-bridge", daemon=True
        )
        self.thread.start()
        atexit.register(self.close)

    def run(self, work: Callable[[Any], Awaitable[T]], doing: str) -> T:
        """``work(connection)`` on the bridge's loop; the caller's thread waits for it."""
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(
            self._run(work, doing), self.loop
        )
        return future.result()

    async def _run(self, work: Callable[[Any], Awaitable[T]], doing: str) -> T:
        try:
            if self.pool is None:
                self.pool = await self.make_pool()
            async with self.pool.acquire() as conn:
                return await work(conn)
        except self.errors as e:
            raise self.translate(e, doing) from e

    def close(self) -> None:
        if self.loop.is_closed() or not self.thread.is_alive():
            return
        if self.pool is not None:
            done = asyncio.run_coroutine_threadsafe(_close_pool(self.pool), self.loop)
            try:
                done.result(timeout=5)
            except Exception as e:  # noqa: BLE001 - at exit, a pool that will not close is left
                logger.debug("closing the PostgreSQL bridge's pool: %s", e)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()
        atexit.unregister(self.close)


async def _close_pool(pool: Any) -> None:
    await asyncio.wait_for(pool.close(), 3)
