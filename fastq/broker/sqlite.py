"""``sqlite:///path``: the embedded, durable default broker. No server; the file is the queue.

One row per message. A message is deliverable when ``visible_at`` has passed. A fetch claims a batch
in one transaction: it writes this broker's lease owner and pushes ``visible_at`` one lease ahead;
while the consumer lives, a background task keeps pushing it. Ack deletes the row, a retry sets
``visible_at`` to the retry time, a dead letter moves the row to ``fastq_dead_letters`` with its
reason. If the consumer dies, its leases lapse and the messages are visible again: at-least-once,
across restarts, with any number of producer processes and supervisors on one file (WAL, writers
take turns with ``BEGIN IMMEDIATE``, a settle only touches rows this broker still leases).

URL query: ``lease`` seconds (default 60; renewed every lease/3), ``synchronous`` ``normal``
(default: a committed message survives the process crashing, not the machine losing power) or
``full`` (survives that too, slower), ``poll`` seconds between looks at an empty queue that no
publish in this process woke (default 0.05).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from fastq import results
from fastq.broker import sqlite_runs as runs_sql
from fastq.broker import sqlite_sql as sql
from fastq.broker import sqlite_storage as storage
from fastq.broker import sqlite_wake
from fastq.broker.base import (
    DeadLetter,
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
from fastq.errors import BrokerStorageError, ConfigError, FastqError
from fastq.workflow.state import RunTx, drive

T = TypeVar("T")

#: the loop's connection leaves checkpoints to the thread: one every this many of its commits
CHECKPOINT_EVERY = 256
#: ... or as soon as the WAL file is this large: a burst must not grow it until the disk is full
CHECKPOINT_WAL_BYTES = 16 << 20
#: a WAL reset by a checkpoint is cut back to this size (SQLite's journal_size_limit)
WAL_LIMIT_BYTES = 16 << 20

logger = logging.getLogger(__name__)


def parse_url(url: str) -> tuple[str, dict[str, list[str]]]:
    """``sqlite:///relative.db`` or ``sqlite:////absolute.db``: the path, and the query."""
    parts = urllib.parse.urlsplit(url)
    if (
        parts.scheme != "sqlite"
        or parts.netloc
        or not parts.path.startswith("/")
        or parts.path == "/"
    ):
        raise ConfigError(
            f"{mask_url(url)!r} is not a SQLite broker URL; use sqlite:///relative/path.db or "
            "sqlite:////absolute/path.db"
        )
    return parts.path[1:], urllib.parse.parse_qs(parts.query)


class SqliteBroker(ExchangeBroker):
    """See the module docstring. Async methods run on one thread of its own, with its own
    connection; ``publish_sync`` and the dead-letter methods use a connection per calling thread."""

    #: results live in the broker's own file, written in the transaction of their ack
    keeps_results = True
    atomic_outputs = True

    def __init__(self, url: str) -> None:
        self.url = mask_url(url)
        self.path, params = parse_url(url)
        self.lease = query_float(url, params, "lease", 60.0, 1.0)
        self.poll = query_float(url, params, "poll", 0.05, 0.001)
        mode = params.get("synchronous", ["normal"])[-1].lower()
        if mode not in ("normal", "full"):
            raise ConfigError(f"synchronous={mode!r} in {mask_url(url)} must be 'normal' or 'full'")
        self.synchronous = mode
        #: the lease owner this broker writes on what it claims
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._local = threading.local()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._published: asyncio.Event | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._loop_db: sqlite3.Connection | None = None
        self._loop_commits = 0
        self._inline_after = 0.0  # perf_counter time before which exchanges go through the thread
        self._checkpointing = False
        self._purge_after = 0.0
        #: wake-ups across processes: what a send rings, and what a consuming broker listens on
        self._bell = sqlite_wake.Bell(self.path)
        self._door: sqlite_wake.Door | None = None

    # -- connections ------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            try:
                db = storage.open_busy_retrying(self._open_thread_db)
            except sqlite3.Error as e:
                raise self._open_error(e) from e
            self._local.db = db
        return db

    def _open_thread_db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            db.executescript(sql.SCHEMA)
            db.executescript(runs_sql.SCHEMA)
            self._add_columns(db)
        except BaseException:
            db.close()
            raise
        return db

    @staticmethod
    def _add_columns(db: sqlite3.Connection) -> None:
        """Bring a file made by an older fastq up to this schema (columns added since)."""
        have = {row[1] for row in db.execute("PRAGMA table_info(fastq_messages)")}
        for name, kind in sql.ADDED_COLUMNS:
            if name not in have:
                try:
                    db.execute(f"ALTER TABLE fastq_messages ADD COLUMN {name} {kind}")
                except sqlite3.OperationalError as e:  # another process added it meanwhile
                    if "duplicate column" not in str(e):
                        raise
        db.executescript(sql.SCHEMA_AFTER_COLUMNS)

    def _loop_connection(self) -> sqlite3.Connection:
        """The event loop's own connection: it never waits for the write lock (BUSY at once,
        and the caller goes to the thread instead), never checkpoints (the thread does)."""
        if self._loop_db is None:
            try:
                db = sqlite3.connect(self.path, timeout=0.0, isolation_level=None)
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA wal_autocheckpoint=0")
                db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")
            except sqlite3.Error as e:
                raise self._open_error(e) from e
            self._loop_db = db
        return self._loop_db

    def _open_error(self, e: sqlite3.Error) -> FastqError:
        return storage.open_error(self.path, self.url, e)

    def _storage_error(self, e: sqlite3.Error, outcome: str) -> BrokerStorageError | None:
        return storage.storage_error(self.path, e, outcome)

    def _checkpoint(self) -> None:
        self._db().execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _truncate_wal(self) -> None:
        """Copy the WAL into the file and cut it to nothing, waiting for the others' transactions:
        after the storage refused a write, the room a full disk needs first (ignored when it
        fails too: the next try tries again)."""
        try:
            self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            logger.debug("truncating the WAL of %s failed: %s", self.url, e)

    def _wal_bytes(self) -> int:
        try:
            return os.stat(self.path + "-wal").st_size
        except OSError:
            return 0

    def _write(
        self,
        work: Callable[[sqlite3.Connection], T],
        db: sqlite3.Connection | None = None,
        outcome: str = "nothing was written",
    ) -> T:
        """Run ``work`` in one write transaction on ``db``, by default this thread's connection.

        Raises:
            BrokerStorageError: the storage refused it (``outcome`` says what did not happen).
        """
        db = db or self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                result = work(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # never leave a long-lived connection holding the lock
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            stored = self._storage_error(e, outcome)
            if stored is not None:
                raise stored from e
            raise
        return result

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None, "open() the broker first"
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- Broker -----------------------------------------------------------------------------

    async def open(self) -> None:
        if self._executor is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastq-sqlite")
        self._loop = asyncio.get_running_loop()
        self._published = asyncio.Event()
        await self._run(self._db)
        self._renewer = asyncio.create_task(self._renew_leases())

    async def declare(self, queue: str) -> None:
        pass  # a queue is the set of rows that name it

    async def publish(self, queue: str, messages: Sequence[Message]) -> None:
        await self._run(self.publish_sync, queue, messages)

    def publish_sync(self, queue: str, messages: Sequence[Message]) -> None:
        """Enqueue ``messages`` in one transaction (any thread).

        Raises:
            BrokerStorageError: the disk is full or read-only: none of them was enqueued.
            BrokerConnectionError: the file cannot be opened (its directory does not exist...).
        """
        now = time.time()
        rows = [
            (queue, m.message_id, m.body, pack_headers(m.headers), now + m.delay) for m in messages
        ]
        self._write(
            lambda db: db.executemany(sql.INSERT, rows),
            outcome=f"{len(rows)} message(s) to {queue!r} were not enqueued",
        )
        self._wake()

    # -- unique keys and periodic ticks -------------------------------------------------------

    async def publish_unique(self, queue: str, message: Message) -> str:
        return await self._run(self.publish_unique_sync, queue, message)

    def publish_unique_sync(self, queue: str, message: Message) -> str:
        """One transaction: a lapsed key (``unique_for`` passed) is let go, the message is
        inserted unless its key is held (the partial unique index on ``unique_key``), and the
        holder's id is read. Ack and dead-lettering delete the row: that frees the key."""
        key = message.unique_key
        assert key is not None, "a unique send has a unique_key"

        def work(db: sqlite3.Connection) -> str:
            now = time.time()
            until = None if message.unique_for is None else now + message.unique_for
            db.execute(sql.UNIQUE_LAPSE, (key, now))
            row = (queue, message.message_id, message.body, pack_headers(message.headers))
            db.execute(sql.INSERT_UNIQUE, (*row, now + message.delay, key, until))
            holder: str = db.execute(sql.UNIQUE_HOLDER, (key,)).fetchone()[0]
            return holder

        holder = self._write(work, outcome=f"the unique message to {queue!r} was not enqueued")
        if holder == message.message_id:
            self._wake()
        return holder

    def claim_unique(self, key: str, message_id: str, unique_for: float | None) -> str:
        def work(db: sqlite3.Connection) -> str:
            now = time.time()
            db.execute(sql.KEY_LAPSE, (key, now))
            until = None if unique_for is None else now + unique_for
            db.execute(sql.KEY_CLAIM, (key, message_id, until))
            holder: str = db.execute(sql.KEY_HOLDER, (key,)).fetchone()[0]
            return holder

        return self._write(work, outcome=f"unique key {key!r} was not taken")

    def free_unique_sync(self, keys: Sequence[tuple[str, str]]) -> None:
        self._write(lambda db: db.executemany(sql.KEY_FREE, keys))

    async def free_unique(self, keys: Sequence[tuple[str, str]]) -> None:
        await self._run(self.free_unique_sync, keys)

    async def publish_tick(self, schedule: str, tick: float, queue: str, message: Message) -> bool:
        """One transaction: the schedule's row moves forward to ``tick`` (it never moves back,
        so a late supervisor cannot enqueue an older tick again), and only if it moved, the
        message is inserted."""

        def work(db: sqlite3.Connection) -> bool:
            if db.execute(sql.ADVANCE_TICK, (schedule, tick)).rowcount != 1:
                return False
            now = time.time()
            db.execute(
                sql.INSERT,
                (
                    queue,
                    message.message_id,
                    message.body,
                    pack_headers(message.headers),
                    now + message.delay,
                ),
            )
            return True

        done = await self._run(
            lambda: self._write(work, outcome=f"tick {tick} of {schedule} was not enqueued")
        )
        if done:
            self._wake()
        return done

    async def last_tick(self, schedule: str) -> float | None:
        def read() -> float | None:
            row = self._db().execute(sql.LAST_TICK, (schedule,)).fetchone()
            return None if row is None else float(row[0])

        return await self._run(read)

    def _wake(self) -> None:
        """After a commit that made messages: wake a fetch in this process at once, and the
        consuming brokers of this file in other processes (sqlite_wake)."""
        loop, published = self._loop, self._published
        if loop is not None and published is not None and not loop.is_closed():
            loop.call_soon_threadsafe(published.set)
        self._bell.ring()

    def _claim_rows(self, db: sqlite3.Connection, queue: str, max_messages: int) -> list[Any]:
        now = time.time()
        rows = db.execute(
            sql.CLAIM, (self.owner, now + self.lease, queue, now, max_messages)
        ).fetchall()
        rows.sort()  # RETURNING has no order; ids are publish order
        return rows

    @staticmethod
    def _deliveries(queue: str, rows: list[Any]) -> list[Delivery]:
        return [Delivery(r[0], queue, r[2], r[1], r[4], r[5], unpack_headers(r[3])) for r in rows]

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
        """Publish the outputs, store the results, settle and claim, in one write transaction;
        then, while nothing was claimed, look again (woken by a publish in this process, else
        less often each time) until ``timeout`` or ``wake``."""
        assert self._published is not None, "open() the broker first"
        if fetch > 0 and self._door is None and self._loop is not None:  # a consumer: listen
            self._door = sqlite_wake.Door(self.path, self._loop, self._published.set)
            self._bell.own = self._door.slot  # this process is woken in process
        deadline = time.monotonic() + timeout
        settle = (
            (ack, retry, dead, release, results, outputs)
            if ack or retry or dead or release or results or outputs
            else None
        )
        pause = 0.001
        while True:
            self._published.clear()
            if settle is None and fetch <= 0:
                return []
            try:
                out = await self._exchange_now(queue, settle, fetch)
            except BrokerStorageError:
                await self._run(self._truncate_wal)  # what a full disk needs first, if it can
                raise
            settle = None
            remaining = deadline - time.monotonic()
            if out or fetch <= 0 or remaining <= 0 or (wake is not None and wake.is_set()):
                return out
            await wait_either(self._published, wake, min(pause, remaining))
            if wake is not None and wake.is_set():  # the caller has work (outcomes to settle):
                return []  # back to it now, not after one more claim that finds nothing
            if not self._published.is_set():  # other processes publish without telling us
                pause = min(pause * 2, self.poll)

    async def _exchange_now(
        self, queue: str, settle: tuple[Any, ...] | None, fetch: int
    ) -> list[Delivery]:
        """One exchange, on the loop's thread when the write lock is free now: a round trip to
        the broker's thread costs the supervisor several times the transaction itself. With
        synchronous=full a commit waits for the disk, so that mode always uses the thread."""
        start = time.perf_counter()
        if self.synchronous == "normal" and start >= self._inline_after:
            try:
                out = self._exchange(queue, settle, fetch, self._loop_connection())
            except sqlite3.OperationalError as e:
                if not storage.busy(e):
                    raise
            else:
                # Fairness: SQLite's waiters sleep and poll, so a writer that starts again at once
                # would starve them (producers, other supervisors). Back to back, every other
                # exchange goes through the thread: the lock is free at least as long as we held it.
                end = time.perf_counter()
                self._inline_after = end + (end - start)
                self._loop_commits += 1
                due = self._loop_commits >= CHECKPOINT_EVERY or (
                    self._wal_bytes() > CHECKPOINT_WAL_BYTES
                )
                if due and not self._checkpointing:
                    self._loop_commits, self._checkpointing = 0, True
                    done = asyncio.get_running_loop().run_in_executor(
                        self._executor, self._checkpoint
                    )
                    done.add_done_callback(self._checkpointed)
                return out
        return await self._run(self._exchange, queue, settle, fetch)  # waits its turn for the lock

    def _checkpointed(self, done: asyncio.Future[None]) -> None:
        self._checkpointing = False
        if not done.cancelled() and done.exception() is not None:
            logger.warning("checkpointing %s failed: %s", self.url, done.exception())

    def _exchange(
        self,
        queue: str,
        settle: tuple[Any, ...] | None,
        fetch: int,
        db: sqlite3.Connection | None = None,
    ) -> list[Delivery]:
        now, me = time.time(), self.owner

        made: list[str] = []  # the workflow steps its results made ready

        def work(db: sqlite3.Connection) -> list[Any]:
            made.clear()  # a try that rolled back made nothing
            if settle is not None:
                ack, retry, dead, release, results, outputs = settle
                if outputs:
                    db.executemany(
                        sql.INSERT,
                        [
                            (
                                o.queue,
                                o.message.message_id,
                                o.message.body,
                                pack_headers(o.message.headers),
                                now + o.message.delay,
                            )
                            for o in outputs
                        ],
                    )
                if results:
                    self._store_results(db, results, now, made)
                if dead:
                    db.executemany(sql.BURY, [(reason, now, tag, me) for tag, reason in dead])
                    db.executemany(sql.ACK, [(tag, me) for tag, _ in dead])
                if ack:
                    db.execute(sql.ACK_MANY, (me, json.dumps(ack)))
                if retry:
                    db.executemany(sql.RETRY, [(now + r.delay, r.reason, r.tag, me) for r in retry])
                if release:
                    db.executemany(sql.RELEASE, [(now, tag, me) for tag in release])
            return self._claim_rows(db, queue, fetch) if fetch > 0 else []

        rows = self._write(
            work, db, outcome=f"settling and claiming on {queue!r} did not happen (it is retried)"
        )
        if settle is not None and (
            settle[3]
            or any(r.delay <= 0 for r in settle[1])
            or any(o.message.delay <= 0 for o in settle[5])
            or made
        ):  # it made messages visible now (releases, outputs, retries, workflow steps): wake who
            self._wake()  # fetches; a delayed one is found by a look (at most poll apart)

        return self._deliveries(queue, rows)

    # -- results (fastq.results) ------------------------------------------------------------

    def _store_results(
        self,
        db: sqlite3.Connection,
        results: Sequence[StoredResult],
        now: float,
        made: list[str] | None = None,
    ) -> None:
        """Write ``results`` in the caller's transaction; expired ones are purged at most once a
        second (expiry on write). A workflow step's outcome is recorded in its run instead, and
        what it makes ready enqueued (listed in ``made``), in that same transaction."""
        if any(r.step is not None for r in results):
            steps = [(r.step, r.outcome) for r in results if r.step is not None]
            runs_sql.record(db, self._runs(db, now, made), steps, now)
            results = [r for r in results if r.step is None]
        db.executemany(
            sql.PUT_RESULT,
            [(r.message_id, r.handler, r.outcome, r.ttl, now + r.ttl) for r in results],
        )
        if now >= self._purge_after:
            self._purge_after = now + 1.0
            db.execute(sql.PURGE_TOMBSTONES, (now,))
            db.execute(sql.PURGE_OUTCOMES, (now,))

    def _runs(
        self, db: sqlite3.Connection, now: float, made: list[Any] | None = None
    ) -> runs_sql.SqliteRuns:
        """A RunTx whose enqueued messages go to this broker's queues (listed in ``made``)."""

        def enqueue(queue: str, message_id: str, body: bytes, headers: dict[str, str]) -> None:
            db.execute(sql.INSERT, (queue, message_id, body, pack_headers(headers), now))
            if made is not None:
                made.append(message_id)

        return runs_sql.SqliteRuns(db, enqueue, made)

    def _outboxed(
        self, db: sqlite3.Connection, into: list[tuple[int, Output]]
    ) -> runs_sql.SqliteRuns:
        """A RunTx whose enqueued messages go to the outbox (as a result store) and ``into``."""

        def enqueue(queue: str, message_id: str, body: bytes, headers: dict[str, str]) -> None:
            cur = db.execute(runs_sql.OUTBOX_PUT, (queue, message_id, body, pack_headers(headers)))
            assert cur.lastrowid is not None
            into.append((cur.lastrowid, Output(queue, Message(body, message_id, headers))))

        return runs_sql.SqliteRuns(db, enqueue, into)

    async def record_steps(self, steps: Sequence[StoredResult]) -> list[tuple[int, Output]]:
        def work(db: sqlite3.Connection) -> list[tuple[int, Output]]:
            made: list[tuple[int, Output]] = []
            done = [(r.step, r.outcome) for r in steps if r.step is not None]
            runs_sql.record(db, self._outboxed(db, made), done, time.time())
            return made  # without what a rolled-back step made (SqliteRuns.forget)

        return await self._run(
            lambda: self._write(work, outcome=f"{len(steps)} workflow step(s) were not recorded")
        )

    def outbox_done_sync(self, ids: Sequence[int]) -> None:
        self._write(lambda db: db.executemany(runs_sql.OUTBOX_DONE, [(i,) for i in ids]))

    async def outbox_done(self, ids: Sequence[int]) -> None:
        await self._run(self.outbox_done_sync, ids)

    async def pending_outbox(self) -> list[tuple[int, Output]]:
        def read() -> list[tuple[int, Output]]:
            rows = self._db().execute(runs_sql.OUTBOX, (0,)).fetchall()
            return [
                (r[0], Output(r[1], Message(bytes(r[3]), r[2], unpack_headers(r[4])))) for r in rows
            ]

        return await self._run(read)

    def run_transaction(
        self,
        work: Callable[[RunTx], Coroutine[Any, Any, T]],
        *,
        write: bool = True,
        outbox: list[tuple[int, Output]] | None = None,
    ) -> T:
        """One transaction on this thread's connection (any thread); a read-only one
        (``write=False``) reads one snapshot of the file without the write lock."""
        if outbox is not None:
            return self._write(lambda db: drive(work(self._outboxed(db, outbox))))
        if not write:
            db = self._db()
            db.execute("BEGIN")
            try:
                return drive(work(self._runs(db, time.time())))
            finally:
                db.execute("COMMIT")
        made: list[str] = []
        out = self._write(
            lambda db: drive(work(self._runs(db, time.time(), made))),
            outcome="the workflow run was not changed",
        )
        if made:  # it enqueued steps (a start, a resume): wake who fetches
            self._wake()
        return out

    async def put_results(self, results: Sequence[StoredResult]) -> None:
        now = time.time()
        await self._run(
            lambda: self._write(
                lambda db: self._store_results(db, results, now),
                outcome=f"{len(results)} result(s) were not stored (they are written again)",
            )
        )

    def get_result(self, message_id: str) -> bytes | None:
        row = self._db().execute(sql.GET_RESULT, (message_id,)).fetchone()
        if row is None:
            return None
        return results.unexpired(message_id, *row)

    async def _renew_leases(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            await self._run(
                lambda: self._write(
                    lambda db: db.execute(sql.RENEW, (time.time() + self.lease, self.owner))
                )
            )

    async def queue_depth(self, queue: str) -> QueueDepth:
        def depth() -> tuple[int, ...]:
            db = self._db()
            return (
                *db.execute(sql.DEPTH, (time.time(), queue)).fetchone(),
                db.execute(sql.DEAD_COUNT, (queue,)).fetchone()[0],
            )

        row = await self._run(depth)
        return QueueDepth(ready=row[0], unacked=row[1], delayed=row[2], dead=row[3])

    async def close(self) -> None:
        """Stop renewing leases and release what this broker still holds: it is visible at once."""
        if self._door is not None:
            self._door.close()
            self._door = None
            self._bell.own = -1  # the slot is free: another consumer may take it
        if self._executor is None:
            return
        if self._renewer is not None:
            self._renewer.cancel()
            try:
                await self._renewer
            except asyncio.CancelledError:
                pass
        await self._run(
            lambda: self._write(
                lambda db: db.execute(
                    "UPDATE fastq_messages SET visible_at = ?, lease_owner = NULL WHERE "
                    "lease_owner = ?",
                    (time.time(), self.owner),
                )
            )
        )
        await self._run(self._close_db)
        if self._loop_db is not None:
            self._loop_db.close()
            self._loop_db = None
        self._executor.shutdown()
        self._executor = None

    def _close_db(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- dead letters (any thread) ----------------------------------------------------------

    def dead_letters(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, oldest first, with the reason each one failed."""
        rows = (
            self._db()
            .execute(
                "SELECT id, queue, message_id, body, attempts, retries, reason, failed_at, headers "
                "FROM fastq_dead_letters WHERE ?1 IS NULL OR queue = ?1 ORDER BY id LIMIT ?2",
                (queue, limit),
            )
            .fetchall()
        )
        return [DeadLetter.from_row(r) for r in rows]

    def requeue_dead_letters(
        self, ids: Sequence[int] | None = None, *, queue: str | None = None
    ) -> int:
        """Put dead letters (all, those of ``queue``, or those ``ids``) back, with fresh counts."""
        where = "(?1 IS NULL OR queue = ?1)" + (
            "" if ids is None else f" AND id IN ({','.join(str(int(i)) for i in ids) or 'NULL'})"
        )

        def work(db: sqlite3.Connection) -> int:
            db.execute(
                "INSERT INTO fastq_messages (queue, message_id, body, headers, visible_at) "
                f"SELECT queue, message_id, body, headers, ?2 FROM fastq_dead_letters WHERE "
                f"{where} "
                "ORDER BY id",
                (queue, time.time()),
            )
            return db.execute(f"DELETE FROM fastq_dead_letters WHERE {where}", (queue,)).rowcount

        return self._write(work)

    def dead_letter(self, id: int | str, *, queues: Sequence[str] = ()) -> DeadLetter | None:
        row = (
            self._db()
            .execute(
                "SELECT id, queue, message_id, body, attempts, retries, reason, failed_at, headers "
                "FROM fastq_dead_letters WHERE id = ?",
                (int(id),),
            )
            .fetchone()
        )
        return None if row is None else DeadLetter.from_row(row)

    def purge(self, queue: str) -> int:
        return self._write(
            lambda db: (
                db.execute(
                    "DELETE FROM fastq_messages WHERE queue = ? AND visible_at <= ?",
                    (queue, time.time()),
                ).rowcount
            )
        )

    def purge_dead_letters(self, queue: str) -> int:
        return self._write(
            lambda db: (
                db.execute("DELETE FROM fastq_dead_letters WHERE queue = ?", (queue,)).rowcount
            )
        )
