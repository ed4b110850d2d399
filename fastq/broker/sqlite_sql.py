"""The SQLite broker's tables and the statements it runs on them (fastq.broker.sqlite).

One row per message in ``fastq_messages``, deliverable once ``visible_at`` has passed; a claim
writes the lease owner; the failed for good move to ``fastq_dead_letters`` with their reason.
Kept results are rows of ``fastq_results`` until their ``purge_at``: then the outcome is dropped
and the row stays as a tombstone for one more ttl (a late reader learns "expired", not
"unknown"), then it goes.
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
    last_error TEXT
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
"""
INSERT = (
    "INSERT INTO fastq_messages (queue, message_id, body, headers, visible_at) "
    "VALUES (?, ?, ?, ?, ?)"
)
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
