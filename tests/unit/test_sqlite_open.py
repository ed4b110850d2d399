"""Opening the SQLite broker's file while another process holds it: a BUSY answered at once
(without SQLite's busy handler, as when a new file switches to WAL) is tried again, bounded;
any other error is not."""

from __future__ import annotations

import sqlite3

import pytest

from fastq.broker import sqlite_storage


def _busy_error(path) -> sqlite3.OperationalError:
    """A real SQLITE_BUSY: a write while another connection holds the file exclusively."""
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0.0, isolation_level=None)
    try:
        other.execute("CREATE TABLE t (x)")
    except sqlite3.OperationalError as e:
        return e
    finally:
        other.close()
        holder.execute("ROLLBACK")
        holder.close()
    raise AssertionError("the write did not meet the lock")


def test_a_busy_open_is_tried_again_until_it_works(tmp_path):
    busy = _busy_error(tmp_path / "a.db")
    assert busy.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY
    tries = []

    def open_db() -> sqlite3.Connection:
        tries.append(1)
        if len(tries) < 4:
            raise busy
        return sqlite3.connect(tmp_path / "b.db")

    db = sqlite_storage.open_busy_retrying(open_db)
    assert len(tries) == 4
    db.close()


def test_another_error_is_not_retried(tmp_path):
    tries = []

    def open_db() -> sqlite3.Connection:
        tries.append(1)
        raise sqlite3.OperationalError("unable to open database file")

    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        sqlite_storage.open_busy_retrying(open_db)
    assert len(tries) == 1


def test_a_busy_that_lasts_gives_up_after_the_bound(tmp_path, monkeypatch):
    busy = _busy_error(tmp_path / "a.db")
    monkeypatch.setattr(sqlite_storage, "OPEN_BUSY_SECONDS", 0.05)
    tries = []

    def open_db() -> sqlite3.Connection:
        tries.append(1)
        raise busy

    with pytest.raises(sqlite3.OperationalError) as raised:
        sqlite_storage.open_busy_retrying(open_db)
    assert raised.value is busy and 2 <= len(tries) <= 10
