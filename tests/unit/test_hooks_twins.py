"""fastq._hooks and its twin make the same records and count the same runs the same way:
outcomes, buckets (a value on a bound falls in that bound's bucket, Prometheus's ``le``), sums, a
handler met on two queues, a rejected message, and the restart after a take."""

from __future__ import annotations

import importlib
import time
from types import ModuleType

import pytest

from fastq import tally, wire

BOUNDS = (0.001, 0.01, 0.1, 1.0)


@pytest.fixture(
    params=[pytest.param("cython", marks=pytest.mark.cython), "python"],
)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return importlib.import_module(
        "fastq._hooks" if request.param == "cython" else "fastq._hooks_py"
    )


def _ran(
    impl: ModuleType,
    t: object,
    queue: str,
    task: str,
    took: float,
    waited: float,
    outcome: str = "ok",
) -> None:
    """One run that started ``took`` seconds ago, enqueued ``waited`` seconds before it started."""
    p = impl.Processing(task, "id", queue, 0, None, 0.0)
    t.before_process(p)  # type: ignore[attr-defined]
    p.clock -= took
    p.enqueued_at = p.clock - waited if waited else 0.0
    p.outcome = outcome
    t.after_process(p, None if outcome == "ok" else ValueError("no"))  # type: ignore[attr-defined]


def test_both_count_outcomes_bin_spans_and_restart_after_a_take(impl: ModuleType) -> None:
    t = impl.Tally(BOUNDS, BOUNDS)
    assert not t.pending and t.take() == []
    _ran(impl, t, "q", "a", 0.0004, 0.05)  # first handler bucket; latency bucket 0.1
    _ran(impl, t, "q", "a", 0.05, 0.0)  # handler bucket 0.1; no enqueue time: no latency
    _ran(impl, t, "q", "a", 5.0, 2.0, "retried")  # above every bound: +Inf
    _ran(impl, t, "q", "a", 0.5, 0.0005, "dead")
    _ran(impl, t, "other", "a", 0.005, 0.005)  # the same handler name on a second queue
    t.after_reject(impl.Processing("", "", "q", 0), "undecodable")
    assert t.pending
    got = {(c[0], c[1]): c for c in t.take()}
    a = got[("q", "a")]
    assert a[2:6] == (4, 2, 1, 1)
    assert a[6] == [1, 0, 1, 1, 1] and a[8] == [1, 0, 1, 0, 1]
    assert a[7] == pytest.approx(5.5504, abs=1e-3) and a[9] == pytest.approx(2.0505, abs=1e-3)
    assert got[("other", "a")][2:7] == (1, 0, 0, 0, [0, 1, 0, 0, 0])
    assert got[("q", "")][2:6] == (0, 0, 0, 1)
    assert not t.pending and t.take() == []


def test_a_span_on_a_bound_falls_in_that_bound_s_bucket(impl: ModuleType) -> None:
    t = impl.Tally(BOUNDS, (0.001, 0.125, 1.0))
    on_bound = impl.Processing("a", "id", "q", 0, None, 1023.875)
    on_bound.clock = 1024.0  # started 0.125 s (exact in binary) after its enqueue
    t.after_process(on_bound, None)
    # a negative span (another host's clock ahead of ours) falls in the first bucket
    ahead = impl.Processing("a", "id", "q", 0, None, time.time() + 3600)
    ahead.clock = time.time() + 3600
    t.after_process(ahead, None)
    (c,) = t.take()
    assert c[8] == [1, 1, 0, 0]
    assert c[6] == [1, 0, 0, 0, 1]


def test_both_refuse_bounds_that_are_not_ascending_or_too_many(impl: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"^bucket bounds must be ascending and at most 32; got"):
        impl.Tally((1.0, 0.5), BOUNDS)
    with pytest.raises(ValueError, match=r"at most 32"):
        impl.Tally(BOUNDS, tuple(float(i) for i in range(33)))


def test_the_report_frame_carries_what_the_tally_took() -> None:
    t = tally.new()
    assert tally.report(t) is None
    _ran(importlib.import_module(type(t).__module__), t, "q", "a", 0.002, 0.003)
    frame = tally.report(t)
    assert frame is not None and tally.report(t) is None
    (counts,) = wire.parse_tally(frame[wire.COMPLETION.size :])
    assert (counts.queue, counts.task, counts.processed) == ("q", "a", 1)
    assert len(counts.handler_buckets) == len(wire.HANDLER_BUCKETS) + 1
    assert sum(counts.latency_buckets) == 1


def test_both_make_the_same_record(impl: ModuleType) -> None:
    p = impl.Processing("add", "m1", "q", 2, {"tenant": "a"}, 12.5)
    assert (p.id, p.task, p.queue, p.attempt, p.headers, p.enqueued_at) == (
        "m1",
        "add",
        "q",
        3,
        {"tenant": "a"},
        12.5,
    )
    assert (p.outcome, p.result, p.span, p.clock, p.started_at) == ("", None, None, 0.0, 0.0)
    assert repr(p) == "<Processing add id='m1' queue='q' attempt=3 outcome=''>"
    bare = impl.Processing("add", "", "q", 0)
    assert (bare.headers, bare.enqueued_at) == ({}, 0.0)
    # hooks set what they need
    p.outcome, p.result, p.span, p.started_at = "ok", [1], ("span", 1), 3.5
    assert (p.outcome, p.result, p.span, p.started_at) == ("ok", [1], ("span", 1), 3.5)
