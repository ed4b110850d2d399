"""The embedded broker's disk: full, or read-only, for real (a 64 MiB tmpfs; ``chattr +i`` on the
directory and its files, which stops root too). A send refuses with what happened and that the
messages were not enqueued; the supervisor waits, retrying every second at most, and goes on once it
can write again; nothing enqueued is lost or run twice."""

from __future__ import annotations

import collections
import os

import pytest
from conftest import read_only
from faulttree import Tree, enqueue

from fastq import BrokerStorageError
from fastq.testing import wait_until


def _fill(directory, leave: int = 0) -> None:
    """Write a file that takes the disk's space, all but ``leave`` bytes."""
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    with open(directory / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))
        f.flush()
        os.fsync(f.fileno())


def test_a_full_disk_refuses_sends_in_words_and_the_engine_resumes_when_there_is_room(
    tmp_path, small_disk
):
    # Given 2,000 messages queued on a SQLite file, and then a disk with no room left
    tree = Tree(tmp_path, f"sqlite:///{small_disk / 'q.db'}")
    try:
        enqueue(tree, 2_000)
        _fill(small_disk)
        # When a producer sends: it is told the disk is full and that nothing was enqueued
        accepted: list[int] = []
        with pytest.raises(BrokerStorageError) as refused:
            for k in range(200):  # SQLite may still fit a page or two in what the WAL holds
                batch = [10_000 + 100 * k + i for i in range(100)]
                tree.app.record.send_many((n,) for n in batch)
                accepted += batch
        assert f"the disk holding {small_disk / 'q.db'} is full: 100 message(s) to " in str(
            refused.value
        )
        assert str(refused.value).endswith(
            "were not enqueued (database or disk is full); free space there, then try again"
        )
        # And a supervisor started on the full disk cannot claim; once space is back it runs all
        proc = tree.start("--processes", "2", "--log-level", "info")
        wait_until(lambda: "is full" in tree.logtext(proc), 60, tree.logtext)
        (small_disk / "filler").unlink()
        expected = {str(i) for i in range(2_000)} | {str(n) for n in accepted}
        tree.wait_for_distinct(len(expected), timeout=120)
        assert tree.stop(proc) == 0
        # Then what was queued ran exactly once (the refused batch, not at all)
        counts = collections.Counter(tree.lines())
        assert set(counts) == expected and set(counts.values()) == {1}
        log = tree.logtext(proc)
        assert "settling and fetching on" in log and "works again after" in log
    finally:
        tree.close()


def test_a_read_only_directory_mid_run_costs_nothing_once_it_is_writable_again(tmp_path):
    # Given a supervisor working through 5,000 messages (400 a second) on a file in a directory
    data = tmp_path / "data"
    data.mkdir()
    tree = Tree(tmp_path, f"sqlite:///{data / 'q.db'}")
    try:
        enqueue(tree, 5_000, task="crawl")
        proc = tree.start("--processes", "2", "--queue", tree.q + ".crawl", "--log-level", "info")
        wait_until(lambda: len(tree.lines()) >= 500, 60, tree.logtext)
        # When the directory and its files turn read-only mid-run
        with read_only(data):
            # Then a send says so and enqueues nothing; the supervisor waits, retrying
            with pytest.raises(BrokerStorageError, match=r"were not enqueued"):
                tree.app.crawl.send(99_999)
            wait_until(
                lambda: (
                    "I/O error on" in tree.logtext(proc)
                    or "cannot be written" in tree.logtext(proc)
                ),
                30,
                tree.logtext,
            )
            done = len(set(tree.lines()))
        assert done < 5_000, "it finished before the directory turned read-only"
        # And once it is writable again every message runs, each once
        tree.wait_for_distinct(5_000, timeout=180)
        assert tree.stop(proc) == 0
        counts = collections.Counter(tree.lines())
        assert set(counts) == {str(i) for i in range(5_000)}
        assert set(counts.values()) == {1}
    finally:
        tree.close()
