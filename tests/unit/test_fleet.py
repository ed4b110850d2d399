"""The fleet's decisions without processes: restarts and their backoff, the death rule of each
front door, suspects placed alone with a worker kept free for them, recycling one at a time.

Members get real rings (the dispatcher writes to them) but fake processes."""

from __future__ import annotations

import itertools

import pytest

from fastq.broker.base import Delivery
from fastq.config import Config
from fastq.engine.fleet import (
    MAX_WORKER_DEATHS,
    DeathPolicy,
    Fate,
    Fleet,
    Member,
    Recycling,
    restart_delay,
)
from fastq.engine.pump import Pumps
from fastq.ring import Dispatcher, Ring
from fastq.wire import EXIT_RECYCLED, WorkerSpec

ENGINE = DeathPolicy(alone_from=1, counts_every_death=False)
POOL = DeathPolicy(alone_from=2, counts_every_death=True)
_pids = itertools.count(1000)


class FakeProcess:
    def __init__(self) -> None:
        self.pid, self.exitcode, self.sentinel = next(_pids), None, next(_pids)
        self.joined = False

    def is_alive(self) -> bool:
        return self.exitcode is None

    def join(self, timeout: float | None = None) -> None:
        self.joined = True

    def kill(self) -> None:
        self.exitcode = -9

    def exit(self, code: int) -> None:
        self.exitcode = code


class FakeLauncher:
    def __init__(self) -> None:
        self.spawned: list[tuple[str, FakeProcess]] = []

    def rings(self, size_bytes: int) -> tuple[Ring, Ring]:
        return Ring.create(size_bytes), Ring.create(size_bytes)

    def spawn(self, spec: WorkerSpec, name: str) -> FakeProcess:
        process = FakeProcess()
        self.spawned.append((name, process))
        return process


def _spec(m: Member) -> WorkerSpec:
    assert m.inbox is not None and m.outbox is not None
    return WorkerSpec(
        index=m.index,
        parent=1,
        cpu=m.cpu,
        app="",
        queues=("q",),
        input_ring=m.inbox.name,
        output_ring=m.outbox.name,
        concurrency=1,
        executor="x:y",
    )


@pytest.fixture
def fleet():
    launcher = FakeLauncher()
    f = Fleet((0, 1), Dispatcher(2, 1), _spec, ring_bytes=64 << 10, name="test", launcher=launcher)
    yield f
    f.release_all()


def _dispatch_to(fleet: Fleet, index: int, *tags: int) -> None:
    assert fleet.dispatcher.dispatch_to(index, [(t, 0, 0, b"x") for t in tags]) == []


def test_restarts_back_off_from_half_a_second_doubling_to_thirty():
    assert [restart_delay(n) for n in range(9)] == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_worker_that_never_got_ready_counts_a_failure_and_readiness_resets_the_count(fleet):
    # Given a worker started and dying before its READY, twice
    m = fleet[0]
    fleet.start(m)
    assert fleet.launcher.spawned[-1][0] == "test-0"
    m.process.exit(1)
    first = fleet.reap(m)
    fleet.start(m)
    m.process.exit(1)
    second = fleet.reap(m)
    # Then each is a failure to start, not a death, and the restarts back off
    assert (first.before_ready, first.restart_in, second.restart_in, m.failures) == (
        True,
        0.5,
        1.0,
        2,
    )
    assert m.process is None and m.inbox is None and m.outbox is None  # rings unlinked
    # And once one comes up, the count starts again: a later death restarts at once
    fleet.start(m)
    fleet.became_ready(m)
    assert m.failures == 0 and fleet.accepting(m)
    _dispatch_to(fleet, 0, 7, 8)
    m.process.kill()
    gone = fleet.reap(m)
    assert (gone.before_ready, gone.recycled, gone.lost, gone.restart_in) == (
        False,
        False,
        [7, 8],
        0.0,
    )
    assert not fleet.accepting(m)


def test_a_worker_that_leaves_with_the_recycle_exit_code_did_not_die(fleet):
    m = fleet[1]
    fleet.start(m)
    fleet.became_ready(m)
    m.process.exit(EXIT_RECYCLED)
    gone = fleet.reap(m)
    assert gone.recycled and not gone.before_ready
    fleet.start(m)
    m.process.exit(0)  # a handler's os._exit(0) is no recycle
    assert not fleet.reap(m).recycled


@pytest.mark.parametrize(
    ("policy", "deaths", "alone", "expected"),
    [
        # the engine: a crowd's death counts once, one alone is the certain cause
        (ENGINE, 0, False, (1, Fate.SUSPECT)),
        (ENGINE, 1, False, (1, Fate.SUSPECT)),
        (ENGINE, 1, True, (2, Fate.SUSPECT)),
        (ENGINE, 2, True, (3, Fate.GIVE_UP)),
        # the pool knows what ran: every death counts, alone from the second
        (POOL, 0, False, (1, Fate.AGAIN)),
        (POOL, 1, False, (2, Fate.SUSPECT)),
        (POOL, 2, True, (3, Fate.GIVE_UP)),
    ],
)
def test_each_front_door_counts_deaths_by_its_rule(policy, deaths, alone, expected):
    assert policy.after_death(deaths, alone) == expected


def test_a_message_that_kills_every_worker_it_runs_on_is_given_up_at_the_third_death():
    # Given one delivery held by a worker, with a bystander beside it
    pumps = Pumps(None, Config(), ["q"], {"q": 10}, lambda items: None)  # type: ignore[arg-type]
    for tag in (1, 2):
        pumps.pending[tag] = pumps_pending(pumps, tag)
    # When their worker dies in a crowd: both become suspects
    assert pumps.lost([1, 2], None, ENGINE, died=True) == ([], [1, 2], [])
    # the bystander passes alone; the killer runs alone and kills its worker twice more
    del pumps.pending[2]
    assert pumps.lost([1], 1, ENGINE, died=True) == ([], [1], [])
    assert pumps.lost([1], 1, ENGINE, died=True) == ([], [], [1])
    assert MAX_WORKER_DEATHS == 3


def test_what_a_recycled_worker_held_goes_on_as_it_was():
    pumps = Pumps(None, Config(), ["q"], {"q": 10}, lambda items: None)  # type: ignore[arg-type]
    pumps.pending[1] = pumps_pending(pumps, 1)
    pumps.pending[2] = pumps_pending(pumps, 2)
    pumps.pending[2].deaths = 1  # a suspect already
    again, suspects, dead = pumps.lost([1, 2], None, ENGINE, died=False)
    assert ([item[0] for item in again], suspects, dead) == ([1], [2], [])
    assert (pumps.pending[1].deaths, pumps.pending[2].deaths) == (0, 1)


def pumps_pending(pumps, tag):
    from fastq.engine.pump import Pending

    d = Delivery(tag=tag, queue="q", body=b"x", message_id=f"m{tag}", attempts=1)
    return Pending("q", d, (tag, 0, 0, b"x"))


def test_a_suspect_waits_for_an_idle_worker_which_is_kept_free_of_new_work(fleet):
    # Given two ready workers that both hold work
    for m in fleet:
        fleet.start(m)
        fleet.became_ready(m)
    _dispatch_to(fleet, 0, 10, 11)
    _dispatch_to(fleet, 1, 20)
    fleet.suspects.append(99)
    sent = []

    def send(m: Member, tag: int) -> bool:
        sent.append((m.index, tag))
        _dispatch_to(fleet, m.index, tag)
        return True

    # When the suspects are placed: none is idle, so the least busy is reserved for it
    fleet.place_suspects(lambda tag, index: True, send)
    assert (sent, fleet.reserved) == ([], 1)
    assert not fleet.accepting(fleet[1]) and fleet.accepting(fleet[0])
    # Then once it is idle, the suspect runs there alone, and it takes nothing else meanwhile
    fleet.dispatcher.complete(1, [_ok(20)])
    fleet.place_suspects(lambda tag, index: True, send)
    assert (sent, fleet.reserved, fleet[1].solo) == ([(1, 99)], None, 99)
    assert not fleet.accepting(fleet[1])
    # And when it completes, the worker takes work again
    fleet.dispatcher.complete(1, [_ok(99)])
    assert fleet.passed(fleet[1]) and fleet.accepting(fleet[1])


def test_a_suspect_waits_for_a_worker_that_may_run_its_queue(fleet):
    for m in fleet:
        fleet.start(m)
        fleet.became_ready(m)
    fleet.suspects.append(5)
    fleet.place_suspects(lambda tag, index: index == 1, lambda m, tag: True)
    assert fleet[1].solo == 5 and fleet[0].solo is None


def test_recycling_lets_one_go_at_a_time_in_the_order_they_asked():
    r = Recycling()
    r.ask(1)
    r.ask(0)
    r.ask(1)  # asking again changes nothing
    assert list(r.asked) == [1, 0]
    assert r.grant(lambda i: True) == 1
    assert r.grant(lambda i: True) is None  # one is leaving
    assert not r.back(0) and r.back(1)  # 1's replacement is up: the next may go
    assert r.grant(lambda i: True) == 0
    r.refused(0)  # its go-ahead did not fit in its ring
    assert list(r.asked) == [0] and r.leaving is None  # first again, next time
    r.ask(1)
    assert r.grant(lambda i: i != 0) == 1  # 0 is gone: forgotten, the next goes
    r.forget(1)
    assert list(r.asked) == []


def _ok(tag: int) -> bytes:
    from fastq.wire import COMPLETION, Status

    return COMPLETION.pack(tag, Status.OK, 0.0)
