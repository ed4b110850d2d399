"""What the SQLite broker's storage said, in words (fastq.broker.sqlite): a file that cannot be
opened, a disk that is full or read-only, an I/O error; each names the path and what to do."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable

from fastq.errors import BrokerConnectionError, BrokerStorageError, FastqError

#: SQLite's primary result codes of a storage that refused a write: what happened, what to do
PROBLEMS = {
    sqlite3.SQLITE_FULL: ("the disk holding {path} is full", "free space there, then try again"),
    sqlite3.SQLITE_READONLY: (
        "{path} cannot be written (a read-only file or file system)",
        "make it writable again, then try again",
    ),
    sqlite3.SQLITE_IOERR: ("an I/O error on {path}", "check the disk and its file system"),
    sqlite3.SQLITE_CANTOPEN: (
        "{path} cannot be opened for writing",
        "check that its directory exists and is writable",
    ),
}


def primary_code(e: sqlite3.Error) -> int:
    """SQLite's primary result code of ``e`` (its extended code without the detail; 0 when the
    error carries none)."""
    return int(getattr(e, "sqlite_errorcode", 0)) & 0xFF


def busy(e: sqlite3.Error) -> bool:
    """``e`` is SQLITE_BUSY (any BUSY_*): another connection holds what this one needs."""
    return primary_code(e) == sqlite3.SQLITE_BUSY


#: seconds a new connection keeps trying while another process holds the file in a way SQLite
#: answers BUSY to at once, without its busy handler (switching a new file to WAL, recovery)
OPEN_BUSY_SECONDS = 30.0


def open_busy_retrying(open_db: Callable[[], sqlite3.Connection]) -> sqlite3.Connection:
    """``open_db()``, tried again (5 ms, doubling to 200 ms) while it fails BUSY, for up to
    OPEN_BUSY_SECONDS: several supervisors started at once on a new file meet each other there
    (seen: one of three on a new result store exited with "database is locked")."""
    deadline, pause = time.monotonic() + OPEN_BUSY_SECONDS, 0.005
    while True:
        try:
            return open_db()
        except sqlite3.OperationalError as e:
            if not busy(e) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


def open_error(path: str, url: str, e: sqlite3.Error) -> FastqError:
    """What opening the file at ``path`` (``url``, masked) failed on: the path, or its storage."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(directory):
        stored = storage_error(path, e, "the broker could not be opened")
        if stored is not None:
            return stored
        hint = f"check that {directory} is writable by this user and {path} is a database"
    else:
        hint = f"the directory {directory} does not exist; create it or change the path"
    return BrokerConnectionError(f"cannot open the SQLite broker at {url} ({e}): {hint}")


def storage_error(path: str, e: sqlite3.Error, outcome: str) -> BrokerStorageError | None:
    """``e`` as a BrokerStorageError when the storage refused a write (full, read-only, an I/O
    error), saying that ``outcome``; None for any other error."""
    problem = PROBLEMS.get(primary_code(e))
    if problem is None:
        return None
    what, fix = problem
    return BrokerStorageError(f"{what.format(path=os.path.abspath(path))}: {outcome} ({e}); {fix}")
