"""``postgresql://user:pass@host:port/db?schema=fastq``: many hosts on one PostgreSQL database.

Tables in a schema of their own, made on first use (``fastq.broker.postgres_sql``). The supervisor
claims a batch at a time with ``FOR UPDATE SKIP LOCKED``, each claim a lease (the row's
``visible_at`` pushed one lease ahead and renewed every lease/3 while its broker lives, so a dead
host's messages come back when its leases lapse), and settles the last batch and claims the next
in one round trip (a server-side function). Acks are batched deletes; retries set the available-at
time; dead letters move to their own table with the reason. An idle supervisor sleeps on
``LISTEN``: an insert's ``NOTIFY`` (a trigger, whoever inserts) wakes it when the inserting
transaction commits; a look every ``poll`` seconds (default 2) covers a lost notification, and a
queue whose next message is delayed is looked at when it becomes visible.

``task.send_async(..., connection=conn)`` enqueues with the caller's asyncpg connection, inside
its transaction: the message exists only if that transaction commits (``send`` takes a psycopg 3
connection the same way).

URL query (removed before the URL reaches asyncpg): ``schema`` (a plain identifier, default
``fastq``), ``lease`` seconds (default 30), ``poll`` seconds (default 2), ``pool`` connections
of the supervisor (default 8). Everything else in the URL is asyncpg's (``sslmode``...).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

import asyncpg

from fastq.broker import postgres_runs as runs_sql
from fastq.broker import postgres_sql as sql
from fastq.broker.base import (
    Delivery,
    ExchangeBroker,
    Message,
    Output,
    QueueDepth,
    Retry,
    Signal,
    StoredResult,
    mask_url,
    pack_headers,
    query_float,
    unpack_headers,
    wait_either,
)
from fastq.broker.postgres_sync import AnyThread, Bridge
from fastq.errors import BrokerConnectionError, BrokerStorageError, ConfigError
from fastq.workflow import run
from fastq.workflow.state import RunTx

__all__ = ["PostgresBroker", "parse_url"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: rows a broker deletes (acks, dead letters) between two VACUUMs of the messages table
VACUUM_EVERY = 20_000
#: the query parameters that are the broker's own; the rest of the URL goes to asyncpg
OWN_PARAMS = ("schema", "lease", "poll", "pool")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
#: what asyncpg raises when the server is gone or refuses us for now
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
)
#: what asyncpg raises when the server's storage refuses a write
_STORAGE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DiskFullError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)
_ERRORS = (*_CONNECTION_ERRORS, *_STORAGE_ERRORS)


def parse_url(url: str) -> tuple[str, dict[str, list[str]]]:
    """The URL asyncpg gets (without fastq's own parameters), and fastq's parameters."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres") or not parts.path.strip("/"):
        raise ConfigError(
            f"{mask_url(url)!r} is not a PostgreSQL broker URL; use "
            "postgresql://user:password@host:port/database?schema=fastq"
        )
    pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    own = urllib.parse.parse_qs(
        urllib.parse.urlencode([(k, v) for k, v in pairs if k in OWN_PARAMS])
    )
    rest = urllib.parse.urlencode([(k, v) for k, v in pairs if k not in OWN_PARAMS])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), own


class PostgresBroker(AnyThread, ExchangeBroker):
    """See the module docstring. Async methods run on the loop that opened it, over a pool of
    connections; ``publish_sync``, ``get_result`` and the dead-letter methods run on a thread of
    the broker's own with its own small pool (any calling thread)."""

    keeps_results = True
    atomic_outputs = True

    def __init__(self, url: str) -> None:
        self.url = mask_url(url)
        self._dsn, params = parse_url(url)
        schema = params.get("schema", ["fastq"])[-1]
        if not _IDENTIFIER.match(schema):
            raise ConfigError(
                f"schema={schema!r} in {self.url} must be a plain lowercase identifier "
                "(letters, digits, _; at most 63): fastq names its tables after it"
            )
        self.schema = schema
        self.lease = query_float(url, params, "lease", 30.0, 1.0)
        self.poll = query_float(url, params, "poll", 2.0, 0.01)
        self.pool_size = int(query_float(url, params, "pool", 8, 2))
        self.channel = f"fastq_{schema}"
        self.sql = sql.Statements(schema, self.channel, runs_sql.SCHEMA)
        #: the lease owner this broker writes on what it claims
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._pool: asyncpg.Pool | None = None
        #: the tags this broker claimed and has not settled: the leases it renews
        self._held: set[int] = set()
        #: rows this broker deleted (acks, dead letters) since its last VACUUM, and that VACUUM
        self._deleted = 0
        self._vacuum: asyncio.Task[None] | None = None
        self._events: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._bridge: Bridge | None = None
        self._bridge_lock = threading.Lock()

    # -- errors -----------------------------------------------------------------------------

    def translate(self, e: BaseException, doing: str) -> BaseException:
        """An asyncpg or socket error as fastq's (the URL masked; the cause kept by the caller)."""
        if isinstance(e, _STORAGE_ERRORS):
            return BrokerStorageError(
                f"PostgreSQL at {self.url} refused to write ({type(e).__name__}: {e}); {doing}"
            )
        if isinstance(e, _CONNECTION_ERRORS):
            return BrokerConnectionError(
                f"PostgreSQL at {self.url} is unreachable ({type(e).__name__}: {e}); {doing}"
            )
        return e

    async def _call(self, work: Callable[[asyncpg.Connection], Awaitable[T]], doing: str) -> T:
        """Run ``work`` on a pooled connection; connection and storage errors translated."""
        pool = self._pool
        assert pool is not None, "open() the broker first"
        try:
            conn = await pool.acquire()
        except (*_CONNECTION_ERRORS, *_STORAGE_ERRORS) as e:
            raise self.translate(e, doing) from e
        try:
            return await work(conn)
        except (*_CONNECTION_ERRORS, *_STORAGE_ERRORS) as e:
            raise self.translate(e, doing) from e
        finally:
            try:
                await pool.release(conn)
            except Exception as e:  # noqa: BLE001 - the work is done; the pool replaces it
                logger.debug("a connection to %s broke on its way back: %r", self.url, e)
                conn.terminate()

    # -- Broker -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=self.pool_size, reset=_keep_session
            )
        except (*_CONNECTION_ERRORS, asyncpg.exceptions.PostgresError) as e:
            raise BrokerConnectionError(
                f"cannot connect to PostgreSQL at {self.url} ({type(e).__name__}: {e}); check the "
                "URL, that the server runs and that it accepts this user"
            ) from e
        assert pool is not None
        self._pool = pool
        try:
            await self._call(self.sql.prepare, "the schema was not made")
        except BaseException:
            await pool.close()
            self._pool = None
            raise
        self._tasks = [
            asyncio.create_task(self._listen(), name="fastq-pg-listen"),
            asyncio.create_task(self._renew(), name="fastq-pg-renew"),
        ]

    async def declare(self, queue: str) -> None:
        pass  # a queue is the set of rows that name it

    async def publish(self, queue: str, messages: Sequence[Message]) -> None:
        if messages:
            await self._call(
                lambda c: _insert(c, self.sql.insert, queue, messages),
                f"{len(messages)} message(s) to {queue!r} were not enqueued",
            )

    def publish_sync(self, queue: str, messages: Sequence[Message]) -> None:
        """Enqueue ``messages`` in one transaction (any thread).

        Raises:
            BrokerConnectionError: the database is unreachable: none of them was enqueued.
        """
        if messages:
            self.bridge().run(
                lambda c: _insert(c, self.sql.insert, queue, messages),
                f"{len(messages)} message(s) to {queue!r} were not enqueued",
            )

    async def publish_in(self, connection: object, queue: str, messages: Sequence[Message]) -> None:
        if not isinstance(connection, asyncpg.Connection):
            raise ConfigError(
                f"send_async(..., connection=...) takes an asyncpg connection, got "
                f"{type(connection).__name__}; for a psycopg connection use send(..., connection=)"
            )
        if messages:
            await _insert(connection, self.sql.insert, queue, messages)

    def publish_in_sync(self, connection: object, queue: str, messages: Sequence[Message]) -> None:
        cursor = getattr(connection, "cursor", None)
        if isinstance(connection, asyncpg.Connection) or cursor is None:
            raise ConfigError(
                f"send(..., connection=...) takes a psycopg 3 connection, got "
                f"{type(connection).__name__}; for an asyncpg connection use "
                "await send_async(..., connection=conn)"
            )
        if messages:
            with cursor() as cur:
                cur.execute(self.sql.insert_psycopg, sql.insert_args(queue, messages))

    async def publish_unique(self, queue: str, message: Message) -> str:
        return await self._call(
            lambda c: self._unique(c, queue, message), "the unique message was not enqueued"
        )

    def publish_unique_sync(self, queue: str, message: Message) -> str:
        return self.bridge().run(
            lambda c: self._unique(c, queue, message), "the unique message was not enqueued"
        )

    async def _unique(self, conn: asyncpg.Connection, queue: str, m: Message) -> str:
        holder: str = await conn.fetchval(
            self.sql.publish_unique,
            queue,
            m.message_id,
            m.body,
            pack_headers(m.headers),
            m.delay,
            m.unique_key,
            m.unique_for,
        )
        return holder

    async def publish_tick(self, schedule: str, tick: float, queue: str, message: Message) -> bool:
        done: bool = await self._call(
            lambda c: c.fetchval(
                self.sql.publish_tick,
                schedule,
                tick,
                queue,
                message.message_id,
                message.body,
                pack_headers(message.headers),
            ),
            f"tick {tick} of {schedule!r} was not enqueued",
        )
        return done

    async def last_tick(self, schedule: str) -> float | None:
        tick: float | None = await self._call(
            lambda c: c.fetchval(self.sql.last_tick, schedule), "the last tick was not read"
        )
        return tick

    async def exchange(
        self,
        queue: str,
        *,
        ack: Sequence[int] = (),
        retry: Sequence[Retry] = (),
        dead: Sequence[tuple[int, str]] = (),
        release: Sequence[int] = (),
        results: Sequence[StoredResult] = (),
        outputs: Sequence[Output] = (),
        replies: Sequence[StoredResult] = (),
        fetch: int = 0,
        timeout: float = 0.0,
        wake: asyncio.Event | Signal | None = None,
    ) -> list[Delivery]:
        """Publish the outputs, store the results, settle and claim in one round trip; then,
        while nothing was claimed, sleep until a NOTIFY for ``queue``, its next message's time,
        ``poll`` seconds, ``timeout`` or ``wake``, and claim again."""
        deadline = time.monotonic() + timeout
        steps = [r for r in results if r.step is not None]  # workflow steps': recorded in runs
        if steps:
            results = [r for r in results if r.step is None]
        args: list[Any] | None = sql.settle_args(ack, retry, dead, release, results, outputs)
        if steps and args is None:
            args = list(sql.NOTHING)
        if args is None and fetch <= 0:
            return []
        event = self._events.setdefault(queue, asyncio.Event())
        while True:
            event.clear()
            params = args or sql.NOTHING
            rows = await self._call(
                lambda c, p=params, st=steps: self._exchange(c, queue, p, st, max(fetch, 0)),  # type: ignore[misc]
                f"settling and claiming on {queue!r} did not happen (it is retried)",
            )
            steps = []
            if args is not None:
                self._held.difference_update(ack, [r.tag for r in retry], [t for t, _ in dead])
                self._held.difference_update(release)
                self._deleted += len(ack) + len(dead)
                if self._deleted >= VACUUM_EVERY and self._vacuum is None:
                    self._deleted = 0
                    self._vacuum = asyncio.create_task(self._vacuum_messages())
                args = None
            self._held.update(r[0] for r in rows)
            remaining = deadline - time.monotonic()
            if rows or fetch <= 0 or remaining <= 0 or (wake is not None and wake.is_set()):
                return sorted(
                    (
                        Delivery(r[0], queue, r[2], r[1], r[4], r[5], unpack_headers(r[3]))
                        for r in rows
                    ),
                    key=lambda d: d.tag,
                )
            if not event.is_set():
                pause = min(remaining, self.poll)
                due = await self._call(
                    lambda c: c.fetchval(self.sql.next_visible, queue), "looking ahead failed"
                )
                if due is not None:
                    pause = min(pause, max(due, 0.0) + 0.001)
                await wait_either(event, wake, pause)
                if wake is not None and wake.is_set():  # the caller has work: back to it now,
                    return []  # not after one more round trip that claims nothing

    async def _exchange(
        self,
        c: asyncpg.Connection,
        queue: str,
        params: list[Any],
        steps: list[StoredResult],
        fetch: int,
    ) -> list[Any]:
        """The exchange function's call; with workflow steps' outcomes, in one transaction
        after they are recorded and what they made ready enqueued."""
        call = (self.sql.exchange, self.owner, queue, self.lease, *params, fetch)
        if not steps:
            return list(await c.fetch(*call))
        async with c.transaction():
            await self._record(c, runs_sql.PostgresRuns(c, self.schema, self.sql.insert), steps)
            return list(await c.fetch(*call))

    async def _record(
        self,
        c: asyncpg.Connection,
        tx: runs_sql.PostgresRuns,
        steps: Sequence[StoredResult],
    ) -> None:
        """Record each step's outcome under a savepoint (see ``sqlite_runs.record``)."""
        now = time.time()
        for r in steps:
            assert r.step is not None
            made = len(tx.outbox) if tx.outbox is not None else 0
            try:
                async with c.transaction():
                    await run.complete(tx, r.step, r.outcome, now)
            except (asyncpg.PostgresError, *_CONNECTION_ERRORS):
                raise
            except Exception:
                if tx.outbox is not None:
                    del tx.outbox[made:]
                logger.exception(
                    "recording step %s of run %s failed; that run does not move on",
                    r.step.step,
                    r.step.run_id,
                )

    async def record_steps(self, steps: Sequence[StoredResult]) -> list[tuple[int, Output]]:
        made: list[tuple[int, Output]] = []

        async def work(c: asyncpg.Connection) -> None:
            del made[:]  # a retried call starts over
            async with c.transaction():
                tx = runs_sql.PostgresRuns(c, self.schema, self.sql.insert, outbox=made)
                await self._record(c, tx, steps)

        await self._call(work, f"{len(steps)} workflow step(s) were not recorded")
        return made

    async def outbox_done(self, ids: Sequence[int]) -> None:
        await self._call(
            lambda c: runs_sql.outbox_done(c, self.schema, list(ids)), "the outbox kept them"
        )

    def outbox_done_sync(self, ids: Sequence[int]) -> None:
        self.bridge().run(
            lambda c: runs_sql.outbox_done(c, self.schema, list(ids)), "the outbox kept them"
        )

    async def pending_outbox(self) -> list[tuple[int, Output]]:
        return await self._call(
            lambda c: runs_sql.pending_outbox(c, self.schema), "the outbox was not read"
        )

    def run_transaction(
        self,
        work: Callable[[RunTx], Coroutine[Any, Any, T]],
        *,
        write: bool = True,
        outbox: list[tuple[int, Output]] | None = None,
    ) -> T:
        """One transaction on the broker's own thread (any calling thread); a read-only one
        (``write=False``) locks no row."""

        async def go(c: asyncpg.Connection) -> T:
            async with c.transaction(readonly=not write):
                tx = runs_sql.PostgresRuns(
                    c, self.schema, self.sql.insert, lock=write, outbox=outbox
                )
                return await work(tx)

        return self.bridge().run(go, "the workflow run was not changed")

    async def put_results(self, results: Sequence[StoredResult]) -> None:
        await self.exchange("", results=results)

    async def queue_depth(self, queue: str) -> QueueDepth:
        row = await self._call(
            lambda c: c.fetchrow(self.sql.depth, queue), "the depth was not read"
        )
        return QueueDepth(ready=row[0], unacked=row[1], delayed=row[2], dead=row[3])

    async def close(self) -> None:
        """Stop listening and renewing; release what this broker still holds (visible at once,
        and the other supervisors told)."""
        if self._vacuum is not None:
            self._tasks.append(self._vacuum)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self._events = {}  # bound to this loop; the next open() may run on another
        self._held = set()  # released below, or left to lapse
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                async with pool.acquire() as conn:
                    queues = await conn.fetch(self.sql.release_all, self.owner)
                    if queues:
                        await conn.execute(self.sql.notify, sorted({r[0] for r in queues}))
            except (*_CONNECTION_ERRORS, asyncpg.exceptions.PostgresError) as e:
                logger.warning("releasing the leases of %s failed (%s): they lapse", self.url, e)
            await pool.close()
        bridge, self._bridge = self._bridge, None
        if bridge is not None:
            bridge.close()

    # -- background: wake-ups and leases -----------------------------------------------------

    async def _listen(self) -> None:
        """Hold a LISTEN connection; after it is lost, make it again with backoff, and wake
        every waiting queue (notifications may have been missed)."""
        pause = 0.05
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._dsn)
            except (*_CONNECTION_ERRORS, asyncpg.exceptions.PostgresError) as e:
                logger.debug("LISTEN on %s failed (%s); again in %.2f s", self.url, e, pause)
                await asyncio.sleep(pause)
                pause = min(pause * 2, self.poll)
                continue
            try:
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(self.channel, self._notified)
                pause = 0.05
                for event in self._events.values():
                    event.set()
                await lost.wait()
            except _CONNECTION_ERRORS as e:
                logger.debug("LISTEN on %s lost (%s)", self.url, e)
            finally:
                conn.terminate()

    def _notified(self, _conn: object, _pid: int, _channel: str, queue: object) -> None:
        event = self._events.get(str(queue))
        if event is not None:
            event.set()

    async def _vacuum_messages(self) -> None:
        """VACUUM the messages table (one supervisor at a time; the others skip): a queue table
        deletes every row it holds, and a claim scans the dead index entries until a vacuum
        clears them (autovacuum looks once a minute at most)."""

        async def work(conn: asyncpg.Connection) -> None:
            if await conn.fetchval(sql.TRY_VACUUM_LOCK):
                try:
                    await conn.execute(self.sql.vacuum)
                finally:
                    await conn.fetchval(sql.VACUUM_UNLOCK)

        try:
            await self._call(work, "the messages table was not vacuumed")
        except (BrokerConnectionError, BrokerStorageError, asyncpg.exceptions.PostgresError) as e:
            logger.warning("vacuuming the messages of %s failed: %s", self.url, e)
        finally:
            self._vacuum = None

    async def _renew(self) -> None:
        """Push this owner's leases ahead every lease/3, and purge expired results."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self._call(
                    lambda c: c.execute(self.sql.renew, self.owner, self.lease, list(self._held)),
                    "leases lapse",
                )
                await self._call(lambda c: c.execute(self.sql.purge_results), "no purge")
            except (BrokerConnectionError, BrokerStorageError) as e:
                logger.warning("renewing the leases on %s failed: %s", self.url, e)

    # -- any thread ---------------------------------------------------------------------------

    def bridge(self) -> Bridge:
        """The thread that serves callers without a loop, started on first use."""
        with self._bridge_lock:
            if self._bridge is None:
                self._bridge = Bridge(self._bridge_pool, self.translate, _ERRORS)
            return self._bridge

    async def _bridge_pool(self) -> Any:
        pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4, reset=_keep_session)
        async with pool.acquire() as conn:
            await self.sql.prepare(conn)
        return pool


async def _insert(
    conn: asyncpg.Connection, statement: str, queue: str, messages: Sequence[Message]
) -> None:
    await conn.execute(statement, *sql.insert_args(queue, messages))


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """A pooled connection goes back as it is: fastq changes no session state on it (its
    settings are SET LOCAL, its LISTEN is on a connection of its own), so the reset asyncpg would
    run (a round trip per use) buys nothing."""
