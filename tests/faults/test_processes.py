"""Process trees on one host: one killed whole leaves nothing in /dev/shm for long, two do not
pile onto the same cores, a worker stopped for too long is replaced."""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

import psutil
import pytest
from faulttree import Tree, enqueue

import fastq
from fastq.testing import wait_until

SHM = Path("/dev/shm")


def _segments_of(pid: int) -> set[str]:
    return {p.name for p in SHM.iterdir() if p.name.startswith(f"fq-{pid}-")}


def test_a_tree_killed_whole_leaves_rings_that_the_next_supervisor_removes(sqlite_tree):
    # Given a supervisor, its workers and multiprocessing's resource tracker, and beside them a
    # live fastq.Pool in this process (whose rings are not anyone else's to remove)
    with fastq.Pool(processes=1) as pool:
        assert pool.map(abs, [-1]) == [1]
        ours = _segments_of(os.getpid())
        assert len(ours) == 2
        proc = sqlite_tree.start("--processes", "2", "--log-level", "info")
        sqlite_tree.wait_for_workers(proc, 2)
        pid = proc.pid
        assert len(_segments_of(pid)) == 4  # two rings per worker
        # When the whole tree is SIGKILLed at once (the OOM killer, systemctl kill)
        sqlite_tree.kill_tree(proc)
        assert len(_segments_of(pid)) == 4  # nobody was left to unlink them
        # Then the next supervisor removes them at start, and only them
        again = sqlite_tree.start("--processes", "2", "--log-level", "info")
        sqlite_tree.wait_for_workers(again, 2)
        assert _segments_of(pid) == set()
        assert _segments_of(os.getpid()) == ours
        assert "removed 4 ring segments" in sqlite_tree.logtext(again)
        assert sqlite_tree.stop(again) == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_two_supervisors_of_one_process_each_pin_to_different_cores(sqlite_tree):
    # Given two supervisors on one host, each with one worker process (different queues)
    first = sqlite_tree.start("--processes", "1", "--queue", sqlite_tree.q, "--log-level", "info")
    sqlite_tree.wait_for_workers(first, 1)
    second = sqlite_tree.start(
        "--processes", "1", "--queue", sqlite_tree.q + ".slow", "--log-level", "info"
    )
    sqlite_tree.wait_for_workers(second, 1)
    # Then their workers are pinned to two different cores, and the second says why
    (a,) = sqlite_tree.workers(first)
    (b,) = sqlite_tree.workers(second)
    assert len(a.cpu_affinity()) == len(b.cpu_affinity()) == 1
    assert a.cpu_affinity() != b.cpu_affinity()
    assert "other fastq processes on this host hold" in sqlite_tree.logtext(second)
    assert sqlite_tree.stop(second) == 0 and sqlite_tree.stop(first) == 0


def test_a_worker_stopped_longer_than_the_watchdog_is_replaced_and_its_messages_run_elsewhere(
    sqlite_tree,
):
    # Given 20,000 messages and two workers, with a watchdog of 1.5 s
    enqueue(sqlite_tree, 20_000, task="slow")
    proc = sqlite_tree.start(
        "--processes", "2", "--log-level", "info", env={"FASTQ_WORKER_STOPPED_TIMEOUT": "1.5"}
    )
    sqlite_tree.wait_for_workers(proc, 2)
    wait_until(lambda: len(sqlite_tree.lines()) >= 2_000, 60, sqlite_tree.logtext)
    # When one worker is stopped (SIGSTOP) and stays stopped
    victim = sqlite_tree.workers(proc)[0]
    victim.send_signal(signal.SIGSTOP)
    # Then the watchdog kills it and starts another, and every message runs
    wait_until(
        lambda: not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE,
        30,
        sqlite_tree.logtext,
    )
    sqlite_tree.wait_for_workers(proc, 2)
    sqlite_tree.wait_for_distinct(20_000, timeout=180)
    assert sqlite_tree.stop(proc) == 0
    # the whole log (logtext keeps the last 4,000 characters); on a slow machine the victim may
    # still have been importing the app: the before-ready path says the same (test below)
    log = sqlite_tree.logs[proc.pid].read_text()
    assert "was stopped for 1.5 s or more (SIGSTOP?) and was killed" in log
    counts = collections.Counter(sqlite_tree.lines())
    assert set(counts) == {str(i) for i in range(20_000)}  # at least once (it may have run
    # handlers whose completions it never wrote back)


def test_a_worker_stopped_before_it_is_ready_is_replaced_and_the_log_says_so(tmp_path):
    # Given a worker that takes its time importing the app (while a flag file is there)
    flag = tmp_path / "slow-import"
    flag.touch()
    tree = Tree(
        tmp_path,
        f"sqlite:///{tmp_path / 'q.db'}",
        extra=f"""
        import multiprocessing, time
        while multiprocessing.parent_process() is not None and os.path.exists({str(flag)!r}):
            time.sleep(0.05)
        """,
    )
    try:
        enqueue(tree, 200)
        proc = tree.start(
            "--processes", "1", "--log-level", "info", env={"FASTQ_WORKER_STOPPED_TIMEOUT": "1.5"}
        )
        tree.wait_for_workers(proc, 1)  # pinned, then importing
        (victim,) = tree.workers(proc)
        # When it is stopped before it reported ready, and the import would go on after that
        victim.send_signal(signal.SIGSTOP)
        flag.unlink()
        # Then the watchdog kills it, its log says so (not "exited with -9"), another one runs
        # every message
        wait_until(
            lambda: not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE,
            30,
            tree.logtext,
        )
        tree.wait_for_distinct(200, timeout=60)
        assert tree.stop(proc) == 0
        log = tree.logs[proc.pid].read_text()
        assert (
            f"worker 0 (pid {victim.pid}) was stopped for 1.5 s or more (SIGSTOP?) and was killed "
            "before it was ready" in log
        )
        assert collections.Counter(tree.lines()) == collections.Counter(str(i) for i in range(200))
    finally:
        tree.close()
