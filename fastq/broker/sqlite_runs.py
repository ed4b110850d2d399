"""Workflow runs in the SQLite broker's own file (``fastq.workflow``): the tables, and the
``RunTx`` the state machine reads and writes inside one of the broker's write transactions."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from fastq.workflow import run
from fastq.workflow.state import RunRow, StepRef, StepRow, drive

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS fastq_runs (
    run_id TEXT PRIMARY KEY,
    workflow TEXT NOT NULL,
    graph BLOB NOT NULL,         -- fastq.workflow.state.Graph, msgpack: the steps as started
    args BLOB NOT NULL,          -- the start arguments (msgpack array): what root steps take
    state TEXT NOT NULL,         -- running, done, failed
    created_at REAL NOT NULL,
    finished_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS fastq_runs_created ON fastq_runs (workflow, created_at);
CREATE INDEX IF NOT EXISTS fastq_runs_finished ON fastq_runs (workflow, finished_at);
CREATE TABLE IF NOT EXISTS fastq_run_steps (  -- idx -1: the step; 0..n-1: its fan-out elements
    run_id TEXT NOT NULL,
    step TEXT NOT NULL,
    idx INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    queued_at REAL NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    result BLOB,
    error TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (run_id, step, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fastq_run_counters (  -- wait:<step>, left:<step>, open
    run_id TEXT NOT NULL,
    name TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (run_id, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fastq_run_outbox (  -- as another broker's result store (RabbitMQ):
    id INTEGER PRIMARY KEY AUTOINCREMENT,        -- the steps made ready, until published there
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    headers BLOB
);
CREATE TABLE IF NOT EXISTS fastq_run_context (
    run_id TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
"""
OUTBOX_PUT = "INSERT INTO fastq_run_outbox (queue, message_id, body, headers) VALUES (?, ?, ?, ?)"
OUTBOX = (
    "SELECT id, queue, message_id, body, headers FROM fastq_run_outbox WHERE id > ? ORDER BY id"
)
OUTBOX_DONE = "DELETE FROM fastq_run_outbox WHERE id = ?"
_RUN = "run_id, workflow, graph, args, state, created_at, finished_at"
#: the tables that hold a run's rows
_RUN_TABLES = ("fastq_runs", "fastq_run_steps", "fastq_run_counters", "fastq_run_context")
_STEP = (
    "run_id, step, idx, state, attempts, queued_at, started_at, finished_at, result, error, "
    "message_id"
)


def _run(r: tuple[Any, ...]) -> RunRow:
    return RunRow(r[0], r[1], bytes(r[2]), bytes(r[3]), r[4], r[5], r[6])


def _step(r: tuple[Any, ...]) -> StepRow:
    result = None if r[8] is None else bytes(r[8])
    return StepRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], result, r[9], r[10])


class SqliteRuns:
    """A ``RunTx`` on ``db``, inside the transaction the caller opened (its coroutines never
    suspend: ``drive`` them). It lives for that one transaction, so it keeps the run rows it
    read (a batch of a fan-out's elements reads the same run once) and the step rows it read
    or wrote (a step's row is read again as its child's parent); ``forget`` after a rollback
    to a savepoint."""

    def __init__(
        self,
        db: sqlite3.Connection,
        enqueue: Callable[[str, str, bytes, dict[str, str]], None],
        made: list[Any] | None = None,
    ) -> None:
        self.db, self._enqueue = db, enqueue
        #: where ``enqueue`` also lists what it made (an outbox's rows, for the caller to
        #: publish): cut back with a rollback to a savepoint, which reuses their row ids
        self.made = made
        self._run_rows: dict[str, RunRow | None] = {}
        self._step_rows: dict[tuple[str, str, int], StepRow | None] = {}

    def mark(self) -> int:
        """Where ``forget`` cuts ``made`` back to: take it with the savepoint."""
        return 0 if self.made is None else len(self.made)

    def forget(self, mark: int) -> None:
        """The transaction rolled back to the savepoint taken at ``mark``: drop what was read,
        and what was made since."""
        self._run_rows.clear()
        self._step_rows.clear()
        if self.made is not None:
            del self.made[mark:]

    async def run(self, run_id: str) -> RunRow | None:
        if run_id in self._run_rows:
            return self._run_rows[run_id]
        r = self.db.execute(f"SELECT {_RUN} FROM fastq_runs WHERE run_id = ?", (run_id,)).fetchone()
        row = self._run_rows[run_id] = None if r is None else _run(r)
        return row

    async def put_run(self, row: RunRow) -> None:
        self._run_rows[row.run_id] = row
        self.db.execute(
            f"INSERT OR REPLACE INTO fastq_runs ({_RUN}) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (row.run_id, row.workflow, row.graph, row.args, row.state, row.created_at,
             row.finished_at),
        )  # fmt: skip

    async def runs(self, workflow: str | None, state: str | None, limit: int) -> list[RunRow]:
        rows = self.db.execute(
            f"SELECT {_RUN} FROM fastq_runs WHERE (?1 IS NULL OR workflow = ?1) AND "
            "(?2 IS NULL OR state = ?2) ORDER BY created_at DESC LIMIT ?3",
            (workflow, state, limit),
        ).fetchall()
        return [_run(r) for r in rows]

    async def step(self, run_id: str, step: str, index: int) -> StepRow | None:
        key = (run_id, step, index)
        if key in self._step_rows:
            row = self._step_rows[key]
        else:
            r = self.db.execute(
                f"SELECT {_STEP} FROM fastq_run_steps WHERE run_id = ? AND step = ? AND idx = ?",
                key,
            ).fetchone()
            row = self._step_rows[key] = None if r is None else _step(r)
        return None if row is None else msgspec.structs.replace(row)  # the caller's to change

    async def steps(self, run_id: str, step: str | None = None) -> list[StepRow]:
        if step is None:
            rows = self.db.execute(
                f"SELECT {_STEP} FROM fastq_run_steps WHERE run_id = ? ORDER BY step, idx",
                (run_id,),
            ).fetchall()
        else:
            rows = self.db.execute(
                f"SELECT {_STEP} FROM fastq_run_steps WHERE run_id = ? AND step = ? AND idx >= 0 "
                "ORDER BY idx",
                (run_id, step),
            ).fetchall()
        return [_step(r) for r in rows]

    async def put_step(self, row: StepRow) -> None:
        self._step_rows[(row.run_id, row.step, row.index)] = msgspec.structs.replace(row)
        self.db.execute(
            f"INSERT OR REPLACE INTO fastq_run_steps ({_STEP}) VALUES "
            "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.run_id, row.step, row.index, row.state, row.attempts, row.queued_at,
             row.started_at, row.finished_at, row.result, row.error, row.message_id),
        )  # fmt: skip

    async def drop_elements(self, run_id: str, step: str) -> None:
        self._forget_steps(run_id)
        self.db.execute(
            "DELETE FROM fastq_run_steps WHERE run_id = ? AND step = ? AND idx >= 0",
            (run_id, step),
        )

    async def expire(self, workflow: str, before: float, limit: int) -> list[str]:
        rows = self.db.execute(
            "SELECT run_id FROM fastq_runs WHERE workflow = ? AND finished_at > 0 AND "
            "finished_at < ? AND state != 'running' ORDER BY finished_at LIMIT ?",
            (workflow, before, limit),
        ).fetchall()
        ids = [r[0] for r in rows]
        self._delete(ids)
        return ids

    def _forget_steps(self, run_id: str) -> None:
        for key in [k for k in self._step_rows if k[0] == run_id]:
            del self._step_rows[key]

    async def delete_run(self, run_id: str) -> None:
        self._delete([run_id])

    def _delete(self, run_ids: list[str]) -> None:
        """These runs and every row of them go, from the file and from what this keeps."""
        for run_id in run_ids:
            self._run_rows.pop(run_id, None)
            self._forget_steps(run_id)
        for table in _RUN_TABLES:
            self.db.executemany(f"DELETE FROM {table} WHERE run_id = ?", [(i,) for i in run_ids])

    async def add(self, run_id: str, counter: str, delta: int) -> int:
        row = self.db.execute(
            "INSERT INTO fastq_run_counters (run_id, name, value) VALUES (?, ?, ?) "
            "ON CONFLICT (run_id, name) DO UPDATE SET value = value + excluded.value "
            "RETURNING value",
            (run_id, counter, delta),
        ).fetchone()
        return int(row[0])

    async def set(self, run_id: str, counter: str, value: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO fastq_run_counters (run_id, name, value) VALUES (?, ?, ?)",
            (run_id, counter, value),
        )

    async def context(self, run_id: str) -> dict[str, bytes]:
        rows = self.db.execute(
            "SELECT key, value FROM fastq_run_context WHERE run_id = ?", (run_id,)
        ).fetchall()
        return {k: bytes(v) for k, v in rows}

    async def enqueue(
        self, queue: str, message_id: str, body: bytes, headers: dict[str, str]
    ) -> None:
        self._enqueue(queue, message_id, body, headers)

    async def set_context(self, run_id: str, items: dict[str, bytes]) -> None:
        self.db.executemany(
            "INSERT OR REPLACE INTO fastq_run_context (run_id, key, value) VALUES (?, ?, ?)",
            [(run_id, k, v) for k, v in items.items()],
        )


def record(
    db: sqlite3.Connection, tx: SqliteRuns, steps: Sequence[tuple[StepRef, bytes]], now: float
) -> None:
    """Record each step's outcome in the caller's transaction: the batch under one savepoint,
    and only if a step breaks the state machine (a bug, data of another version) again one by
    one, each under its own, so that that one is rolled back and logged, never retried with the
    batch for ever; a storage error rolls the whole transaction back."""
    mark = tx.mark()
    db.execute("SAVEPOINT fastq_steps")
    try:
        for ref, outcome in steps:
            drive(run.complete(tx, ref, outcome, now))
    except sqlite3.Error:
        raise
    except Exception:  # noqa: BLE001 - the one that breaks is found and logged below
        db.execute("ROLLBACK TO fastq_steps")
        tx.forget(mark)
        _one_by_one(db, tx, steps, now)
    db.execute("RELEASE fastq_steps")


def _one_by_one(
    db: sqlite3.Connection, tx: SqliteRuns, steps: Sequence[tuple[StepRef, bytes]], now: float
) -> None:
    for ref, outcome in steps:
        mark = tx.mark()
        db.execute("SAVEPOINT fastq_step")
        try:
            drive(run.complete(tx, ref, outcome, now))
        except sqlite3.Error:
            raise
        except Exception:
            db.execute("ROLLBACK TO fastq_step")
            tx.forget(mark)
            logger.exception(
                "recording step %s (element %d) of run %s failed; that run does not move on",
                ref.step,
                ref.index,
                ref.run_id,
            )
        db.execute("RELEASE fastq_step")
