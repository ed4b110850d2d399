"""The SQLite broker's tables and the statements it runs on them (fastq.broker.sqlite).

One row per message in ``fastq_messages``, deliverable once ``visible_at`` has passed; a claim
writes the lease owner; the failed for good move to ``fastq_dead_letters`` with their reason.
Kept results are rows of ``fastq_results`` until their ``purge_at``: then the outcome is dropped
and the row stays as a tombstone for one more ttl (a late reader learns "expired", not
"unknown"), then it goes.

A unique send's key is a column of its message row (a partial unique index): it is held while
the row exists, so an ack or a dead letter (both delete the row) frees it, a retry does not.
A periodic schedule has one row in ``fastq_schedules`` with the latest tick enqueued: a tick is
enqueued in the transaction that moves that row forward to it, so once whatever the number of
supervisors (and never a tick older than the latest).
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS fastq_messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a tag names one message forever
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    headers BLOB,
    attempts INTEGER NOT NULL DEFAULT 0,
    retries INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL,
    lease_owner TEXT,
    last_error TEXT,
    unique_key TEXT,             -- a unique send's key: held while this row exists
    unique_until REAL            -- ... or until then (NULL: as long as the row exists)
);
CREATE INDEX IF NOT EXISTS fastq_messages_visible ON fastq_messages (queue, visible_at, id);
CREATE TABLE IF NOT EXISTS fastq_dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    headers BLOB,
    attempts INTEGER NOT NULL,
    retries INTEGER NOT NULL,
    reason TEXT NOT NULL,
    failed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS fastq_results (
    message_id TEXT PRIMARY KEY,
    handler TEXT NOT NULL,
    outcome BLOB,                -- NULL: expired (a tombstone)
    ttl REAL NOT NULL,
    expires_at REAL NOT NULL,
    purge_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS fastq_results_purge ON fastq_results (purge_at);
CREATE TABLE IF NOT EXISTS fastq_schedules (
    schedule TEXT PRIMARY KEY,   -- a periodic task's name
    last_tick REAL NOT NULL      -- the latest tick enqueued (epoch seconds); only moves forward
);
CREATE TABLE IF NOT EXISTS fastq_unique_keys (  -- as another broker's result store (RabbitMQ)
    key TEXT PRIMARY KEY,
    message_id TEXT NOT NULL,
    until REAL                   -- NULL: until the supervisor frees it (ack, dead letter)
);
"""
#: columns added after the first release: (name, type), added to an older file at open
ADDED_COLUMNS = (("unique_key", "TEXT"), ("unique_until", "REAL"))
#: what needs the added columns: made once they are there
SCHEMA_AFTER_COLUMNS = """
CREATE UNIQUE INDEX IF NOT EXISTS fastq_messages_unique ON fastq_messages (unique_key)
WHERE unique_key IS NOT NULL;
"""
INSERT = (
    "INSERT INTO fastq_messages (queue, message_id, body, headers, visible_at) "
    "VALUES (?, ?, ?, ?, ?)"
)
#: a unique send, in one transaction: a lapsed key is let go, the insert is ignored while the
#: key is held, and the holder's id is read
UNIQUE_LAPSE = (
    "UPDATE fastq_messages SET unique_key = NULL, unique_until = NULL "
    "WHERE unique_key = ?1 AND unique_until < ?2"
)
INSERT_UNIQUE = (
    "INSERT OR IGNORE INTO fastq_messages "
    "(queue, message_id, body, headers, visible_at, unique_key, unique_until) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
UNIQUE_HOLDER = "SELECT message_id FROM fastq_messages WHERE unique_key = ?"
#: a periodic tick, once: the schedule's row moves forward to it, or nothing changes (0 rows)
ADVANCE_TICK = (
    "INSERT INTO fastq_schedules (schedule, last_tick) VALUES (?1, ?2) "
    "ON CONFLICT (schedule) DO UPDATE SET last_tick = excluded.last_tick "
    "WHERE fastq_schedules.last_tick < excluded.last_tick"
)
LAST_TICK = "SELECT last_tick FROM fastq_schedules WHERE schedule = ?"
#: unique keys kept for a broker that keeps none (the result store's role)
KEY_LAPSE = "DELETE FROM fastq_unique_keys WHERE key = ?1 AND until < ?2"
KEY_CLAIM = "INSERT OR IGNORE INTO fastq_unique_keys (key, message_id, until) VALUES (?, ?, ?)"
KEY_HOLDER = "SELECT message_id FROM fastq_unique_keys WHERE key = ?"
KEY_FREE = "DELETE FROM fastq_unique_keys WHERE key = ? AND message_id = ?"
CLAIM = """
UPDATE fastq_messages SET lease_owner = ?1, visible_at = ?2, attempts = attempts + 1
WHERE id IN (SELECT id FROM fastq_messages WHERE queue = ?3 AND visible_at <= ?4
             ORDER BY visible_at, id LIMIT ?5)
RETURNING id, message_id, body, headers, attempts, retries
"""
ACK = "DELETE FROM fastq_messages WHERE id = ? AND lease_owner = ?"
#: many acks in one statement: the ids as a JSON array (half the cost of executemany per id)
ACK_MANY = (
    "DELETE FROM fastq_messages WHERE lease_owner = ? AND id IN (SELECT value FROM json_each(?))"
)
RETRY = (
    "UPDATE fastq_messages SET visible_at = ?, lease_owner = NULL, retries = retries + 1, "
    "last_error = ? WHERE id = ? AND lease_owner = ?"
)
RELEASE = (
    "UPDATE fastq_messages SET visible_at = ?, lease_owner = NULL WHERE id = ? AND lease_owner = ?"
)
BURY = """
INSERT INTO fastq_dead_letters
    (queue, message_id, body, headers, attempts, retries, reason, failed_at)
SELECT queue, message_id, body, headers, attempts, retries, ?, ? FROM fastq_messages
WHERE id = ? AND lease_owner = ?
"""
RENEW = "UPDATE fastq_messages SET visible_at = ? WHERE lease_owner = ?"
DEPTH = """
SELECT coalesce(sum(visible_at <= ?1), 0),
       coalesce(sum(visible_at > ?1 AND lease_owner IS NOT NULL), 0),
       coalesce(sum(visible_at > ?1 AND lease_owner IS NULL), 0)
FROM fastq_messages WHERE queue = ?2
"""
DEAD_COUNT = "SELECT count(*) FROM fastq_dead_letters WHERE queue = ?"
PUT_RESULT = (
    "INSERT OR REPLACE INTO fastq_results "
    "(message_id, handler, outcome, ttl, expires_at, purge_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)"
)
GET_RESULT = "SELECT outcome, expires_at FROM fastq_results WHERE message_id = ?"
#: expiry on write: tombstones due go, then outcomes due become tombstones for one more ttl
PURGE_TOMBSTONES = "DELETE FROM fastq_results WHERE purge_at < ?1 AND outcome IS NULL"
PURGE_OUTCOMES = (
    "UPDATE fastq_results SET outcome = NULL, purge_at = purge_at + ttl WHERE purge_at < ?1"
)
