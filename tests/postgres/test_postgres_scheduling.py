"""Scheduling end to end on PostgreSQL, with `fastq worker` processes: the SQLite tests of
tests/integration/test_scheduling.py, run again on a schema of their own (delayed sends at their
time, a periodic task once per tick under three supervisors, catch_up "latest", unique sends
from ten processes at once)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from schedhosts import Hosts

sys.path.insert(0, str(Path(__file__).parent.parent / "integration"))
from test_scheduling import (
    test_a_periodic_task_runs_once_per_tick_under_three_supervisors,
    test_catch_up_latest_enqueues_the_last_tick_missed_while_every_supervisor_was_down,
    test_unique_sends_from_ten_processes_enqueue_one_message,
)
from test_scheduling import (
    test_sqlite_delayed_sends_run_at_their_time as test_delayed_sends_run_at_their_time,
)

__all__ = [
    "test_a_periodic_task_runs_once_per_tick_under_three_supervisors",
    "test_catch_up_latest_enqueues_the_last_tick_missed_while_every_supervisor_was_down",
    "test_delayed_sends_run_at_their_time",
    "test_unique_sends_from_ten_processes_enqueue_one_message",
]


@pytest.fixture
def hosts(tmp_path, pg_url):
    """The supervisors of those tests, on PostgreSQL instead of the SQLite file."""
    h = Hosts(tmp_path, pg_url)
    yield h
    h.close()
