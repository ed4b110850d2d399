"""The ack window's contract on both implementations, and a model it must agree with."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def test_the_prefix_moves_only_over_complete_tags(ring_impl):
    w = ring_impl.AckWindow()
    w.done([2, 3])
    assert w.ack_prefix() == 0  # 1 is still running
    w.done([1])
    assert w.ack_prefix() == 3
    assert w.first == 4
    assert w.ack_prefix() == 0


def test_stragglers_are_handed_out_once_and_the_prefix_never_ends_on_one(ring_impl):
    # Given tags 1..5 where 1 runs long and 2..5 are done
    w = ring_impl.AckWindow()
    w.done([2, 3, 5])
    assert w.waiting() == 3
    # When the stragglers are taken (to ack one by one)
    assert w.take_stragglers() == [2, 3, 5]
    assert w.take_stragglers() == []
    assert w.waiting() == 0
    # Then once 1 completes, the cumulative ack stops at 1: 2 and 3 were acked already
    w.done([1])
    assert w.ack_prefix() == 1
    assert w.first == 4
    w.done([4])
    assert w.ack_prefix() == 4  # 5 was acked alone; 4 covers nothing acked twice
    assert w.first == 6


def test_a_tag_below_the_window_is_refused_with_the_reason(ring_impl):
    w = ring_impl.AckWindow(first=10)
    w.done([10])
    assert w.ack_prefix() == 10
    with pytest.raises(
        ValueError, match=r"^tag 10 is below the window, which starts at 11: it was acked already$"
    ):
        w.done([10])
    with pytest.raises(ValueError, match=r"^first must be >= 1, got 0$"):
        ring_impl.AckWindow(first=0)


def test_a_long_run_with_one_slow_tag_keeps_working(ring_impl):
    w = ring_impl.AckWindow()
    w.done(range(2, 100_001))
    assert w.ack_prefix() == 0
    w.done([1])
    assert w.ack_prefix() == 100_000
    w.done(range(100_001, 100_101))
    assert w.ack_prefix() == 100_100


@pytest.mark.cython
@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["done", "prefix", "stragglers"]), st.integers(0, 40)),
        max_size=60,
    )
)
def test_both_implementations_agree_with_a_model(ops):
    from fastq import _core, _core_py

    windows = [_core.AckWindow(), _core_py.AckWindow()]
    done: set[int] = set()
    acked: set[int] = set()  # covered by a cumulative ack or handed out as a straggler
    first = 1
    for op, k in ops:
        if op == "done":
            tag = first + k
            done.add(tag)
            results = [w.done([tag]) for w in windows]
            expected = None
        elif op == "prefix":
            n = first
            while n in done:
                n += 1
            expected = max((t for t in range(first, n) if t not in acked), default=0)
            acked.update(range(first, n))
            first = n
            results = [w.ack_prefix() for w in windows]
        else:
            expected = sorted(t for t in done if t >= first and t not in acked)
            acked.update(expected)
            results = [w.take_stragglers() for w in windows]
        assert results == [expected, expected], (op, k)
        assert [w.first for w in windows] == [first, first]
        assert [w.waiting() for w in windows] == [len({t for t in done if t >= first} - acked)] * 2
