"""The PostgreSQL broker's tables, functions and statements, and the arguments they take
(fastq.broker.postgres).

Everything lives in one schema of its own (``?schema=``, default ``fastq``), made on first use
under an advisory lock and stamped with ``SCHEMA_VERSION`` in ``meta``. One row per message in
``messages``, deliverable once ``visible_at`` (epoch seconds, the database's clock, so that hosts
with skewed clocks agree) has passed; a claim writes the lease owner and pushes ``visible_at``
one lease ahead. A statement-level trigger sends one ``NOTIFY`` per inserting statement and
queue, whoever inserts (fastq, or a caller's own transaction), delivered when it commits. The
supervisor's settle-and-claim is one function call: one round trip per batch.

Every text is a template of ``{s}`` (the schema, already checked to be a plain identifier) and
``{channel}`` (the NOTIFY channel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastq.broker.base import Message, Output, Retry, StoredResult, pack_headers
from fastq.errors import ConfigError

#: the version of the tables below; a database stamped with a newer one is left untouched
SCHEMA_VERSION = 1
#: pg_advisory_xact_lock key under which the schema is made (any two fastq processes agree)
SCHEMA_LOCK = 0x66617374_71000001

NOW = "extract(epoch FROM clock_timestamp())::float8"

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE {s}.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE {s}.messages (
    id bigserial PRIMARY KEY,            -- never reused: a tag names one message forever
    queue text NOT NULL,
    message_id text NOT NULL,
    body bytea NOT NULL,
    headers bytea,
    attempts integer NOT NULL DEFAULT 0,
    retries integer NOT NULL DEFAULT 0,
    visible_at float8 NOT NULL,
    lease_owner text,
    last_error text,
    unique_key text,                     -- a unique send holds it while queued or running
    unique_until float8                  -- NULL: until acked or dead-lettered
);
-- a queue table deletes every row it holds: vacuum it by count, not by a share of its size
ALTER TABLE {s}.messages SET (autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000, autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0, autovacuum_analyze_threshold = 10000);
CREATE INDEX messages_ready ON {s}.messages (queue, visible_at, id);
CREATE INDEX messages_owner ON {s}.messages (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE UNIQUE INDEX messages_unique ON {s}.messages (unique_key) WHERE unique_key IS NOT NULL;
CREATE TABLE {s}.dead_letters (
    id bigserial PRIMARY KEY,
    queue text NOT NULL,
    message_id text NOT NULL,
    body bytea NOT NULL,
    headers bytea,
    attempts integer NOT NULL,
    retries integer NOT NULL,
    reason text NOT NULL,
    failed_at float8 NOT NULL
);
CREATE INDEX dead_letters_queue ON {s}.dead_letters (queue, id);
CREATE TABLE {s}.results (
    message_id text PRIMARY KEY,
    handler text NOT NULL,
    outcome bytea,                       -- NULL: expired (a tombstone)
    ttl float8 NOT NULL,
    expires_at float8 NOT NULL,
    purge_at float8 NOT NULL
);
CREATE INDEX results_purge ON {s}.results (purge_at);
CREATE TABLE {s}.schedules (
    schedule text PRIMARY KEY,
    last_tick float8 NOT NULL            -- only moves forward: an older tick is never enqueued
);

CREATE FUNCTION {s}.notify_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{channel}', q) FROM (SELECT DISTINCT queue AS q FROM inserted) AS t;
    RETURN NULL;
END $$;
CREATE TRIGGER messages_notify AFTER INSERT ON {s}.messages
    REFERENCING NEW TABLE AS inserted FOR EACH STATEMENT EXECUTE FUNCTION {s}.notify_inserted();

-- The supervisor's round trip: publish outputs, keep results, settle (only rows this owner
-- still leases), then claim up to p_fetch, oldest visible first, skipping rows others lock.
CREATE FUNCTION {s}.exchange(
    p_owner text, p_queue text, p_lease float8,
    p_ack bigint[],
    p_retry bigint[], p_retry_delay float8[], p_retry_reason text[],
    p_dead bigint[], p_dead_reason text[],
    p_release bigint[],
    p_out_queue text[], p_out_id text[], p_out_body bytea[], p_out_headers bytea[],
    p_out_delay float8[],
    p_res_id text[], p_res_handler text[], p_res_outcome bytea[], p_res_ttl float8[],
    p_fetch integer)
RETURNS TABLE (id bigint, message_id text, body bytea, headers bytea, attempts integer,
               retries integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t float8 := extract(epoch FROM clock_timestamp());
BEGIN
    -- This transaction's commit does not wait for its WAL flush: lost in a server crash, it is
    -- lost whole (outputs, results and the acks they go with), and the messages it settled or
    -- claimed are delivered again. At least once, one fsync less per batch.
    PERFORM set_config('synchronous_commit', 'off', true);
    IF cardinality(p_out_queue) > 0 THEN
        INSERT INTO {s}.messages (queue, message_id, body, headers, visible_at)
        SELECT q, i, b, h, t + d
        FROM unnest(p_out_queue, p_out_id, p_out_body, p_out_headers, p_out_delay)
            AS u(q, i, b, h, d);
    END IF;
    IF cardinality(p_res_id) > 0 THEN
        INSERT INTO {s}.results AS r (message_id, handler, outcome, ttl, expires_at, purge_at)
        SELECT i, h, o, l, t + l, t + l
        FROM unnest(p_res_id, p_res_handler, p_res_outcome, p_res_ttl) AS u(i, h, o, l)
        ON CONFLICT (message_id) DO UPDATE SET handler = excluded.handler,
            outcome = excluded.outcome, ttl = excluded.ttl, expires_at = excluded.expires_at,
            purge_at = excluded.purge_at;
    END IF;
    IF cardinality(p_dead) > 0 THEN
        INSERT INTO {s}.dead_letters
            (queue, message_id, body, headers, attempts, retries, reason, failed_at)
        SELECT m.queue, m.message_id, m.body, m.headers, m.attempts, m.retries, u.reason, t
        FROM unnest(p_dead, p_dead_reason) WITH ORDINALITY AS u(id, reason, n)
        JOIN {s}.messages m ON m.id = u.id AND m.lease_owner = p_owner
        ORDER BY u.n;
        DELETE FROM {s}.messages WHERE id = ANY(p_dead) AND lease_owner = p_owner;
    END IF;
    IF cardinality(p_ack) > 0 THEN
        DELETE FROM {s}.messages WHERE id = ANY(p_ack) AND lease_owner = p_owner;
    END IF;
    IF cardinality(p_retry) > 0 THEN
        UPDATE {s}.messages AS m SET visible_at = t + u.delay, lease_owner = NULL,
            retries = m.retries + 1, last_error = u.reason
        FROM unnest(p_retry, p_retry_delay, p_retry_reason) AS u(id, delay, reason)
        WHERE m.id = u.id AND m.lease_owner = p_owner;
    END IF;
    IF cardinality(p_release) > 0 THEN
        UPDATE {s}.messages SET visible_at = t, lease_owner = NULL
        WHERE id = ANY(p_release) AND lease_owner = p_owner;
        PERFORM pg_notify('{channel}', p_queue);
    END IF;
    IF p_fetch > 0 THEN
        RETURN QUERY
        UPDATE {s}.messages AS m SET lease_owner = p_owner, visible_at = t + p_lease,
            attempts = m.attempts + 1
        FROM (SELECT c.id FROM {s}.messages AS c WHERE c.queue = p_queue AND c.visible_at <= t
              ORDER BY c.visible_at, c.id LIMIT p_fetch FOR UPDATE SKIP LOCKED) AS c
        WHERE m.id = c.id
        RETURNING m.id, m.message_id, m.body, m.headers, m.attempts, m.retries;
    END IF;
END $$;

-- A unique send: a lapsed key is cleared, then the message goes in unless the key is held;
-- the id of the message that holds the key comes back (a holder acked meanwhile: try again).
CREATE FUNCTION {s}.publish_unique(
    p_queue text, p_id text, p_body bytea, p_headers bytea, p_delay float8, p_key text,
    p_for float8) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    t float8 := extract(epoch FROM clock_timestamp());
    holder text;
BEGIN
    LOOP
        UPDATE {s}.messages SET unique_key = NULL WHERE unique_key = p_key AND unique_until <= t;
        INSERT INTO {s}.messages
            (queue, message_id, body, headers, visible_at, unique_key, unique_until)
        VALUES (p_queue, p_id, p_body, p_headers, t + p_delay, p_key, t + p_for)
        ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING;
        IF FOUND THEN
            RETURN p_id;
        END IF;
        SELECT message_id INTO holder FROM {s}.messages WHERE unique_key = p_key;
        IF holder IS NOT NULL THEN
            RETURN holder;
        END IF;
    END LOOP;
END $$;

-- One periodic tick, enqueued once across every supervisor: the schedule's row moves forward to
-- it and its message goes in, in one transaction; a tick not after the row's is refused.
CREATE FUNCTION {s}.publish_tick(
    p_schedule text, p_tick float8, p_queue text, p_id text, p_body bytea, p_headers bytea)
RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {s}.schedules AS r (schedule, last_tick) VALUES (p_schedule, p_tick)
    ON CONFLICT (schedule) DO UPDATE SET last_tick = excluded.last_tick
    WHERE r.last_tick < excluded.last_tick;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO {s}.messages (queue, message_id, body, headers, visible_at)
    VALUES (p_queue, p_id, p_body, p_headers, extract(epoch FROM clock_timestamp()));
    RETURN true;
END $$;
"""

#: whether the schema was made (then VERSION says which)
EXISTS = "SELECT to_regclass('{s}.meta') IS NOT NULL"
VERSION = "SELECT value::integer FROM {s}.meta WHERE key = 'schema_version'"
STAMP = "INSERT INTO {s}.meta (key, value) VALUES ('schema_version', $1)"
INSERT = (
    "INSERT INTO {s}.messages (queue, message_id, body, headers, visible_at) "
    f"SELECT $1, i, b, h, {NOW} + d "
    "FROM unnest($2::text[], $3::bytea[], $4::bytea[], $5::float8[]) AS u(i, b, h, d)"
)
#: the same for psycopg (``%s`` placeholders, arrays adapted from lists)
INSERT_PSYCOPG = (
    "INSERT INTO {s}.messages (queue, message_id, body, headers, visible_at) "
    f"SELECT %s, i, b, h, {NOW} + d "
    "FROM unnest(%s::text[], %s::bytea[], %s::bytea[], %s::float8[]) AS u(i, b, h, d)"
)
EXCHANGE = (
    "SELECT id, message_id, body, headers, attempts, retries FROM {s}.exchange("
    "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20)"
)
PUBLISH_UNIQUE = "SELECT {s}.publish_unique($1, $2, $3, $4, $5, $6, $7)"
PUBLISH_TICK = "SELECT {s}.publish_tick($1, $2, $3, $4, $5, $6)"
LAST_TICK = "SELECT last_tick FROM {s}.schedules WHERE schedule = $1"
#: when the next message of a queue becomes visible (a retry, a delayed send, a lapsing lease)
NEXT_VISIBLE = f"SELECT min(visible_at) - {NOW} FROM {{s}}.messages WHERE queue = $1"
#: only the rows this broker knows it holds: a claim whose answer was lost (the connection broke
#: after the commit) is not renewed, so it lapses and comes back
RENEW = (
    f"UPDATE {{s}}.messages SET visible_at = {NOW} + $2 "
    "WHERE lease_owner = $1 AND id = ANY($3::bigint[])"
)
RELEASE_ALL = (
    f"UPDATE {{s}}.messages SET visible_at = {NOW}, lease_owner = NULL WHERE lease_owner = $1 "
    "RETURNING queue"
)
NOTIFY = "SELECT pg_notify('{channel}', q) FROM unnest($1::text[]) AS u(q)"
DEPTH = f"""
SELECT count(*) FILTER (WHERE visible_at <= t),
       count(*) FILTER (WHERE visible_at > t AND lease_owner IS NOT NULL),
       count(*) FILTER (WHERE visible_at > t AND lease_owner IS NULL),
       (SELECT count(*) FROM {{s}}.dead_letters WHERE queue = $1)
FROM {{s}}.messages, (SELECT {NOW} AS t) AS now WHERE queue = $1
"""
GET_RESULT = "SELECT outcome, expires_at FROM {s}.results WHERE message_id = $1"
#: a session lock that one supervisor at a time takes to vacuum the messages table
VACUUM_LOCK = 0x66617374_71000002
TRY_VACUUM_LOCK = f"SELECT pg_try_advisory_lock({VACUUM_LOCK})"
VACUUM = "VACUUM {s}.messages"
VACUUM_UNLOCK = f"SELECT pg_advisory_unlock({VACUUM_LOCK})"
#: expiry on write, run by the lease renewer: tombstones due go, then outcomes due become
#: tombstones for one more ttl (a late reader learns "expired", not "unknown")
PURGE_RESULTS = f"""
WITH gone AS (DELETE FROM {{s}}.results WHERE purge_at < {NOW} AND outcome IS NULL)
UPDATE {{s}}.results SET outcome = NULL, purge_at = purge_at + ttl
WHERE purge_at < {NOW} AND outcome IS NOT NULL
"""
DEAD_LETTERS = (
    "SELECT id, queue, message_id, body, attempts, retries, reason, failed_at, headers "
    "FROM {s}.dead_letters WHERE $1::text IS NULL OR queue = $1 ORDER BY id LIMIT $2"
)
REQUEUE = f"""
WITH moved AS (
    DELETE FROM {{s}}.dead_letters
    WHERE ($1::text IS NULL OR queue = $1) AND ($2::bigint[] IS NULL OR id = ANY($2))
    RETURNING id, queue, message_id, body, headers
), inserted AS (
    INSERT INTO {{s}}.messages (queue, message_id, body, headers, visible_at)
    SELECT queue, message_id, body, headers, {NOW} FROM moved ORDER BY id
    RETURNING 1
)
SELECT count(*) FROM inserted
"""
DEAD_LETTER = (
    "SELECT id, queue, message_id, body, attempts, retries, reason, failed_at, headers "
    "FROM {s}.dead_letters WHERE id = $1"
)
#: ready messages only: a leased row's visible_at is its lease's end, a delayed one's its time
PURGE = f"DELETE FROM {{s}}.messages WHERE queue = $1 AND visible_at <= {NOW}"
PURGE_DEAD = "DELETE FROM {s}.dead_letters WHERE queue = $1"


class Statements:
    """The SQL of one schema, formatted once."""

    def __init__(self, schema: str, channel: str, more_schema: str = "") -> None:
        def f(text: str) -> str:
            return text.format(s=schema, channel=channel)

        self.schema_text = f(SCHEMA)
        #: tables of other rooms (workflow runs: postgres_runs.SCHEMA), made where missing
        self.more_schema = f(more_schema) if more_schema else ""
        self.exists, self.version, self.stamp = f(EXISTS), f(VERSION), f(STAMP)
        self.insert, self.insert_psycopg = f(INSERT), f(INSERT_PSYCOPG)
        self.exchange, self.next_visible = f(EXCHANGE), f(NEXT_VISIBLE)
        self.publish_unique, self.publish_tick = f(PUBLISH_UNIQUE), f(PUBLISH_TICK)
        self.last_tick = f(LAST_TICK)
        self.renew, self.release_all, self.notify = f(RENEW), f(RELEASE_ALL), f(NOTIFY)
        self.depth, self.get_result = f(DEPTH), f(GET_RESULT)
        self.purge_results = f(PURGE_RESULTS)
        self.vacuum = f(VACUUM)
        self.dead_letters, self.requeue = f(DEAD_LETTERS), f(REQUEUE)
        self.dead_letter, self.purge, self.purge_dead = (
            f(DEAD_LETTER),
            f(PURGE),
            f(PURGE_DEAD),
        )
        self.schema = schema

    async def prepare(self, conn: Any) -> None:
        """Make the schema if there is none (under an advisory lock: many processes start at
        once); a newer schema than this code's is an error, and nothing is touched."""
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            version = (
                await conn.fetchval(self.version) if await conn.fetchval(self.exists) else None
            )
            if version is None:
                await conn.execute(self.schema_text)
                await conn.execute(self.stamp, str(SCHEMA_VERSION))
            elif version > SCHEMA_VERSION:
                raise ConfigError(
                    f"schema {self.schema!r} holds fastq tables of version {version}, newer than "
                    f"this fastq's {SCHEMA_VERSION}; upgrade fastq on this host, or use "
                    "another ?schema="
                )
            if self.more_schema:
                await conn.execute(self.more_schema)


#: the exchange function's settle arrays when there is nothing to settle
NOTHING: list[Any] = [[], [], [], [], [], [], [], [], [], [], [], [], [], [], [], []]


def settle_args(
    ack: Sequence[int],
    retry: Sequence[Retry],
    dead: Sequence[tuple[int, str]],
    release: Sequence[int],
    results: Sequence[StoredResult],
    outputs: Sequence[Output],
) -> list[Any] | None:
    """The exchange function's settle arrays, in its parameter order (None: nothing to do)."""
    if not (ack or retry or dead or release or results or outputs):
        return None
    for o in outputs:
        if o.exchange:
            raise ConfigError(
                f"publish_to=Route(exchange={o.exchange!r}) needs a broker with exchanges "
                "(amqp://); PostgreSQL has queues only: publish_to a queue name"
            )
    return [
        list(ack),
        [r.tag for r in retry],
        [r.delay for r in retry],
        [r.reason for r in retry],
        [t for t, _ in dead],
        [reason for _, reason in dead],
        list(release),
        [o.queue for o in outputs],
        [o.message.message_id for o in outputs],
        [o.message.body for o in outputs],
        [pack_headers(o.message.headers) for o in outputs],
        [o.message.delay for o in outputs],
        [r.message_id for r in results],
        [r.handler for r in results],
        [r.outcome for r in results],
        [r.ttl for r in results],
    ]


def insert_args(queue: str, messages: Sequence[Message]) -> tuple[Any, ...]:
    """INSERT's (and INSERT_PSYCOPG's) arguments: the queue, then one array per column."""
    return (
        queue,
        [m.message_id for m in messages],
        [m.body for m in messages],
        [pack_headers(m.headers) for m in messages],
        [m.delay for m in messages],
    )
