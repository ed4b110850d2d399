"""Workflow runs in the PostgreSQL broker's schema (``fastq.workflow``): the tables (the SQLite
broker's, ``broker/sqlite_runs.py``, mirrored), and the ``RunTx`` the state machine awaits inside
one transaction on an asyncpg connection. Rows a completion reads to decide are read ``FOR
UPDATE``: two supervisors ending elements of one fan-out take turns on the counters and rows,
so the join is enqueued once across hosts too.

Text templates of ``{s}`` (the schema), as ``postgres_sql``'s. Imports no asyncpg: the
connection it is given is used by its methods only.
"""

from __future__ import annotations

from typing import Any

from fastq.broker.base import Message, Output, pack_headers, unpack_headers
from fastq.workflow.state import RunRow, StepRow

#: made if missing by every broker that opens the schema (IF NOT EXISTS: older schemas gain them)
SCHEMA = """
CREATE TABLE IF NOT EXISTS {s}.runs (
    run_id text PRIMARY KEY,
    workflow text NOT NULL,
    graph bytea NOT NULL,
    args bytea NOT NULL,
    state text NOT NULL,
    created_at float8 NOT NULL,
    finished_at float8 NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_created ON {s}.runs (workflow, created_at);
CREATE INDEX IF NOT EXISTS runs_finished ON {s}.runs (workflow, finished_at);
CREATE TABLE IF NOT EXISTS {s}.run_steps (
    run_id text NOT NULL,
    step text NOT NULL,
    idx integer NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL,
    queued_at float8 NOT NULL,
    started_at float8 NOT NULL,
    finished_at float8 NOT NULL,
    result bytea,
    error text NOT NULL,
    message_id text NOT NULL,
    PRIMARY KEY (run_id, step, idx)
);
CREATE TABLE IF NOT EXISTS {s}.run_counters (
    run_id text NOT NULL,
    name text NOT NULL,
    value integer NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS {s}.run_outbox (  -- as another broker's result store (RabbitMQ)
    id bigserial PRIMARY KEY,
    queue text NOT NULL,
    message_id text NOT NULL,
    body bytea NOT NULL,
    headers bytea
);
CREATE TABLE IF NOT EXISTS {s}.run_context (
    run_id text NOT NULL,
    key text NOT NULL,
    value bytea NOT NULL,
    PRIMARY KEY (run_id, key)
);
"""
_RUN = "run_id, workflow, graph, args, state, created_at, finished_at"
_STEP = (
    "run_id, step, idx, state, attempts, queued_at, started_at, finished_at, result, error, "
    "message_id"
)


def _run(r: Any) -> RunRow:
    return RunRow(r[0], r[1], bytes(r[2]), bytes(r[3]), r[4], r[5], r[6])


def _step(r: Any) -> StepRow:
    result = None if r[8] is None else bytes(r[8])
    return StepRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], result, r[9], r[10])


class PostgresRuns:
    """A ``RunTx`` on an asyncpg connection, inside the transaction the caller opened.

    Parameters:
        conn: the connection (asyncpg), in a transaction.
        schema: the broker's schema (a checked identifier).
        insert: the broker's message insert (``postgres_sql.INSERT`` formatted).
        lock: read rows ``FOR UPDATE`` (a completion); False for reads only.
        outbox: as another broker's result store: what is enqueued goes to the outbox table,
            and to this list with its id, for the caller to publish to that broker.
    """

    def __init__(
        self,
        conn: Any,
        schema: str,
        insert: str,
        *,
        lock: bool = True,
        outbox: list[tuple[int, Output]] | None = None,
    ) -> None:
        self.c, self.s, self.insert, self.outbox = conn, schema, insert, outbox
        self.lock = " FOR UPDATE" if lock else ""

    async def run(self, run_id: str) -> RunRow | None:
        r = await self.c.fetchrow(
            f"SELECT {_RUN} FROM {self.s}.runs WHERE run_id = $1{self.lock}", run_id
        )
        return None if r is None else _run(r)

    async def put_run(self, row: RunRow) -> None:
        await self.c.execute(
            f"INSERT INTO {self.s}.runs ({_RUN}) VALUES ($1, $2, $3, $4, $5, $6, $7) "
            "ON CONFLICT (run_id) DO UPDATE SET state = excluded.state, "
            "finished_at = excluded.finished_at",
            row.run_id, row.workflow, row.graph, row.args, row.state, row.created_at,
            row.finished_at,
        )  # fmt: skip

    async def runs(self, workflow: str | None, state: str | None, limit: int) -> list[RunRow]:
        rows = await self.c.fetch(
            f"SELECT {_RUN} FROM {self.s}.runs WHERE ($1::text IS NULL OR workflow = $1) AND "
            "($2::text IS NULL OR state = $2) ORDER BY created_at DESC LIMIT $3",
            workflow, state, limit,
        )  # fmt: skip
        return [_run(r) for r in rows]

    async def expire(self, workflow: str, before: float, limit: int) -> list[str]:
        # one statement; the runs locked FOR UPDATE and their state checked again once locked
        # (a run resumed meanwhile no longer matches); one that another transaction holds is
        # skipped, left for the next expiry
        rows = await self.c.fetch(
            f"WITH gone AS (DELETE FROM {self.s}.runs WHERE run_id IN ("
            f"SELECT run_id FROM {self.s}.runs WHERE workflow = $1 AND finished_at > 0 AND "
            "finished_at < $2 AND state <> 'running' ORDER BY finished_at LIMIT $3 "
            "FOR UPDATE SKIP LOCKED) RETURNING run_id), "
            f"s AS (DELETE FROM {self.s}.run_steps WHERE run_id IN (SELECT run_id FROM gone)), "
            f"c AS (DELETE FROM {self.s}.run_counters WHERE run_id IN (SELECT run_id FROM gone)), "
            f"x AS (DELETE FROM {self.s}.run_context WHERE run_id IN (SELECT run_id FROM gone)) "
            "SELECT run_id FROM gone",
            workflow, before, limit,
        )  # fmt: skip
        return [r[0] for r in rows]

    async def step(self, run_id: str, step: str, index: int) -> StepRow | None:
        r = await self.c.fetchrow(
            f"SELECT {_STEP} FROM {self.s}.run_steps WHERE run_id = $1 AND step = $2 AND "
            f"idx = $3{self.lock}",
            run_id, step, index,
        )  # fmt: skip
        return None if r is None else _step(r)

    async def steps(self, run_id: str, step: str | None = None) -> list[StepRow]:
        if step is None:
            rows = await self.c.fetch(
                f"SELECT {_STEP} FROM {self.s}.run_steps WHERE run_id = $1 ORDER BY step, idx",
                run_id,
            )
        else:
            rows = await self.c.fetch(
                f"SELECT {_STEP} FROM {self.s}.run_steps WHERE run_id = $1 AND step = $2 AND "
                "idx >= 0 ORDER BY idx",
                run_id, step,
            )  # fmt: skip
        return [_step(r) for r in rows]

    async def put_step(self, row: StepRow) -> None:
        await self.c.execute(
            f"INSERT INTO {self.s}.run_steps ({_STEP}) VALUES "
            "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (run_id, step, idx) DO "
            "UPDATE SET state = excluded.state, attempts = excluded.attempts, "
            "queued_at = excluded.queued_at, started_at = excluded.started_at, "
            "finished_at = excluded.finished_at, result = excluded.result, "
            "error = excluded.error, message_id = excluded.message_id",
            row.run_id, row.step, row.index, row.state, row.attempts, row.queued_at,
            row.started_at, row.finished_at, row.result, row.error, row.message_id,
        )  # fmt: skip

    async def drop_elements(self, run_id: str, step: str) -> None:
        await self.c.execute(
            f"DELETE FROM {self.s}.run_steps WHERE run_id = $1 AND step = $2 AND idx >= 0",
            run_id, step,
        )  # fmt: skip

    async def delete_run(self, run_id: str) -> None:
        for table in ("runs", "run_steps", "run_counters", "run_context"):
            await self.c.execute(f"DELETE FROM {self.s}.{table} WHERE run_id = $1", run_id)

    async def add(self, run_id: str, counter: str, delta: int) -> int:
        value: int = await self.c.fetchval(
            f"INSERT INTO {self.s}.run_counters AS c (run_id, name, value) VALUES ($1, $2, $3) "
            "ON CONFLICT (run_id, name) DO UPDATE SET value = c.value + excluded.value "
            "RETURNING value",
            run_id, counter, delta,
        )  # fmt: skip
        return value

    async def set(self, run_id: str, counter: str, value: int) -> None:
        await self.c.execute(
            f"INSERT INTO {self.s}.run_counters (run_id, name, value) VALUES ($1, $2, $3) "
            "ON CONFLICT (run_id, name) DO UPDATE SET value = excluded.value",
            run_id, counter, value,
        )  # fmt: skip

    async def context(self, run_id: str) -> dict[str, bytes]:
        rows = await self.c.fetch(
            f"SELECT key, value FROM {self.s}.run_context WHERE run_id = $1", run_id
        )
        return {r[0]: bytes(r[1]) for r in rows}

    async def set_context(self, run_id: str, items: dict[str, bytes]) -> None:
        await self.c.executemany(
            f"INSERT INTO {self.s}.run_context (run_id, key, value) VALUES ($1, $2, $3) "
            "ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value",
            [(run_id, k, v) for k, v in items.items()],
        )

    async def enqueue(
        self, queue: str, message_id: str, body: bytes, headers: dict[str, str]
    ) -> None:
        m = Message(body, message_id, headers)
        if self.outbox is not None:
            outbox_id: int = await self.c.fetchval(
                f"INSERT INTO {self.s}.run_outbox (queue, message_id, body, headers) "
                "VALUES ($1, $2, $3, $4) RETURNING id",
                queue, message_id, body, pack_headers(headers),
            )  # fmt: skip
            self.outbox.append((outbox_id, Output(queue, m)))
            return
        await self.c.execute(
            self.insert, queue, [m.message_id], [m.body], [pack_headers(m.headers)], [0.0]
        )


async def pending_outbox(conn: Any, schema: str) -> list[tuple[int, Output]]:
    rows = await conn.fetch(
        f"SELECT id, queue, message_id, body, headers FROM {schema}.run_outbox ORDER BY id"
    )
    return [(r[0], Output(r[1], Message(bytes(r[3]), r[2], unpack_headers(r[4])))) for r in rows]


async def outbox_done(conn: Any, schema: str, ids: list[int]) -> None:
    await conn.execute(f"DELETE FROM {schema}.run_outbox WHERE id = ANY($1::bigint[])", ids)
