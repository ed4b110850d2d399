"""The dispatcher's contract, in one process; every test runs on _core and on _core_py."""

from __future__ import annotations

import struct

import pytest

from fastq._layout import COMPLETION, DELIVERY
from fastq.errors import ConfigError, FrameTooLarge, RingCorrupt, RingEmpty


def deliveries(ring):
    """(tag, retries, queue, body) of every frame in ``ring`` now."""
    out = []
    while True:
        try:
            frames = ring.get_many_nowait(1024)
        except RingEmpty:
            return out
        for f in frames:
            tag, retries, queue = DELIVERY.unpack_from(f)
            out.append((tag, retries, queue, f[DELIVERY.size :]))


def done(tag, status=0, delay=0.0, reason=b""):
    return COMPLETION.pack(tag, status, delay) + reason


@pytest.fixture
def two(ring_impl, make_ring):
    d = ring_impl.Dispatcher(2, queues=2)
    rings = [make_ring(1 << 16), make_ring(1 << 16)]
    for i, r in enumerate(rings):
        d.attach(i, r)
    return d, rings


def test_dispatch_frames_header_and_body_into_the_least_busy_worker(two):
    # Given two idle workers
    d, rings = two
    # When six deliveries are dispatched
    left = d.dispatch([(t, t % 3, t % 2, b"body-%d" % t) for t in range(1, 7)])
    # Then they alternate, each frame is [tag | retries | queue] + body, and none is left
    assert left == []
    assert deliveries(rings[0]) == [(t, t % 3, t % 2, b"body-%d" % t) for t in (1, 3, 5)]
    assert deliveries(rings[1]) == [(t, t % 3, t % 2, b"body-%d" % t) for t in (2, 4, 6)]
    assert d.statistics() == (6, 0, 0, (3, 3))
    assert [d.in_flight(0), d.in_flight(1)] == [3, 3]


def test_dispatch_fills_the_worker_that_holds_fewer(two):
    d, rings = two
    d.dispatch_to(0, [(t, 0, 0, b"x") for t in range(1, 5)])
    d.dispatch([(t, 0, 0, b"y") for t in range(5, 11)])
    # ties go round: the first after the worker chosen last
    assert [t for t, *_ in deliveries(rings[1])] == [5, 6, 7, 8, 10]
    assert [t for t, *_ in deliveries(rings[0])] == [1, 2, 3, 4, 9]


def test_ties_alternate_between_single_dispatches(two):
    # Given work that comes one at a time and is done before the next (a tie every time: noop
    # handlers fed by a trickle)
    d, rings = two
    picks = []
    for t in range(1, 7):
        d.dispatch([(t, 0, 0, b"z")])
        picked = [w for w, r in enumerate(rings) if deliveries(r)]
        picks.extend(picked)
        d.complete(picked[0], [done(t)])
    # Then it goes round instead of always to worker 0
    assert picks == [0, 1, 0, 1, 0, 1]


def test_complete_returns_ok_tags_and_other_outcomes_with_reasons(two):
    d, _ = two
    d.dispatch_to(0, [(t, 0, 0, b"") for t in (1, 2, 3)])
    ok, other = d.complete(
        0, [done(1), done(2, 1, 2.5, b"ValueError: no"), done(0, 3), done(3, 2, 0.0, "é".encode())]
    )
    assert ok == [1]
    assert other == [(2, 1, 2.5, b"ValueError: no"), (0, 3, 0.0, b""), (3, 2, 0.0, "é".encode())]
    assert d.in_flight(0) == 0
    assert d.statistics() == (3, 3, 0, (0, 0))


def test_completions_of_tags_a_worker_no_longer_holds_are_dropped_as_stale(two):
    d, rings = two
    d.dispatch_to(0, [(7, 0, 0, b"")])
    assert d.detach(0) == [7]
    d.attach(0, rings[0])
    assert d.complete(0, [done(7)]) == ([], [])
    assert d.complete(1, [done(7)]) == ([], [])
    assert d.statistics().stale == 2


def test_detach_returns_the_tags_in_order_and_the_worker_gets_no_more(two):
    d, rings = two
    d.dispatch_to(1, [(t, 0, 0, b"") for t in (9, 4, 6)])
    assert d.detach(1) == [4, 6, 9]
    assert d.in_flight(1) == 0
    assert d.dispatch([(10, 0, 0, b"")]) == []
    assert [t for t, *_ in deliveries(rings[0])] == [10]
    assert d.dispatch_to(1, [(11, 0, 0, b"")]) == [(11, 0, 0, b"")]


def test_a_worker_that_does_not_accept_gets_nothing_but_dispatch_to(two):
    d, rings = two
    d.set_accepting(0, False)
    d.dispatch([(t, 0, 0, b"") for t in (1, 2)])
    d.dispatch_to(0, [(3, 0, 0, b"")])
    assert [t for t, *_ in deliveries(rings[1])] == [1, 2]
    assert [t for t, *_ in deliveries(rings[0])] == [3]
    d.set_accepting(1, False)
    assert d.dispatch([(4, 0, 1, b"z")]) == [(4, 0, 1, b"z")]


def test_allow_keeps_a_queue_on_its_workers_and_others_flow_past(two):
    # Given queue 1 allowed on worker 1 only, and worker 1 not accepting
    d, rings = two
    d.allow(1, [1])
    d.set_accepting(1, False)
    # When both queues are dispatched
    left = d.dispatch([(1, 0, 1, b"a"), (2, 0, 0, b"b"), (3, 0, 1, b"c"), (4, 0, 0, b"d")])
    # Then queue 1 waits and queue 0 is not held up behind it
    assert left == [(1, 0, 1, b"a"), (3, 0, 1, b"c")]
    assert [t for t, *_ in deliveries(rings[0])] == [2, 4]
    d.set_accepting(1, True)
    assert d.dispatch(left) == []
    assert [t for t, *_ in deliveries(rings[1])] == [1, 3]


def test_a_full_ring_keeps_what_did_not_fit_in_order(ring_impl, make_ring):
    d = ring_impl.Dispatcher(1)
    ring = make_ring(256)
    d.attach(0, ring)
    items = [(t, 0, 0, bytes(40)) for t in range(1, 10)]  # 64 bytes a frame: 4 fit
    left = d.dispatch(items)
    assert left == items[4:]
    assert d.in_flight(0) == 4
    assert [t for t, *_ in deliveries(ring)] == [1, 2, 3, 4]
    assert d.dispatch(left) == items[8:]


def test_a_closed_ring_takes_nothing(ring_impl, make_ring):
    d = ring_impl.Dispatcher(1)
    ring = make_ring(4096)
    d.attach(0, ring)
    ring.close()
    assert d.dispatch([(1, 0, 0, b"")]) == [(1, 0, 0, b"")]
    assert d.in_flight(0) == 0


def test_a_body_too_large_for_the_ring_raises_before_anything_is_written(two, ring_impl, make_ring):
    d = ring_impl.Dispatcher(1)
    ring = make_ring(256)
    d.attach(0, ring)
    with pytest.raises(
        FrameTooLarge,
        match=r"^delivery 2 of 314 bytes \(header included\) exceeds max_frame_bytes=252 of ring "
        r"'.*'; raise ring_size_bytes or lower max_message_bytes in the Config$",
    ):
        d.dispatch([(1, 0, 0, b""), (2, 0, 0, bytes(300))])
    assert d.in_flight(0) == 0
    assert ring.statistics().frames == 0


def test_memoryview_and_bytearray_bodies_are_copied_as_they_are(two):
    d, rings = two
    d.dispatch_to(0, [(1, 0, 0, memoryview(b"abcdef")[2:]), (2, 0, 0, bytearray(b"xy"))])
    assert [b for *_, b in deliveries(rings[0])] == [b"cdef", b"xy"]


def test_frames_that_wrap_around_the_ring_end_read_back_whole(ring_impl, make_ring, rand):
    d = ring_impl.Dispatcher(1)
    ring = make_ring(1000)
    d.attach(0, ring)
    tag = 0
    for _ in range(200):
        batch = []
        for _ in range(rand.randrange(1, 6)):
            tag += 1
            batch.append((tag, rand.randrange(5), 0, rand.randbytes(rand.randrange(0, 120))))
        assert d.dispatch(batch) == []
        assert deliveries(ring) == [(t, r, q, bytes(b)) for t, r, q, b in batch]
        d.complete(0, [done(t) for t, *_ in batch])
    assert d.statistics() == (tag, tag, 0, (0,))


def test_short_completion_frames_are_reported_as_corrupt(two):
    d, _ = two
    with pytest.raises(
        RingCorrupt, match=r"^worker 0 wrote a completion of 5 bytes, expected at least 17 "
    ):
        d.complete(0, [b"short"])


def test_bad_indexes_and_counts_say_what_is_allowed(ring_impl, make_ring):
    with pytest.raises(ConfigError, match=r"^workers must be 1\.\.65535, got 0$"):
        ring_impl.Dispatcher(0)
    d = ring_impl.Dispatcher(2, queues=1)
    with pytest.raises(
        IndexError, match=r"^worker 2 is outside 0\.\.1; this dispatcher has 2 workers$"
    ):
        d.in_flight(2)
    with pytest.raises(
        IndexError, match=r"^queue index 1 is outside 0\.\.0; this dispatcher has 1 queues$"
    ):
        d.dispatch([(1, 0, 1, b"")])
    ring = make_ring(4096)
    d.attach(0, ring)
    with pytest.raises(
        ConfigError, match=r"^worker 0 already has a ring; detach\(\) it before attaching another$"
    ):
        d.attach(0, ring)


def test_both_implementations_write_the_same_bytes(make_ring):
    from fastq import _core, _core_py

    items = [(2**40 + 1, 7, 3, b"payload"), (5, 0, 65535 % 4, b"")]
    out = []
    for impl in (_core, _core_py):
        d = impl.Dispatcher(1, queues=4)
        r = impl.Ring.create(4096)
        try:
            d.attach(0, r)
            d.dispatch(items)
            out.append(r.get_many_nowait())
        finally:
            r.close()
            r.unlink()
    assert (
        out[0]
        == out[1]
        == [struct.pack("<QIH", 2**40 + 1, 7, 3) + b"payload", struct.pack("<QIH", 5, 0, 3)]
    )


def test_a_detached_worker_accepts_nothing_even_when_told_to(two):
    d, rings = two
    d.detach(0)
    d.set_accepting(0, True)
    assert d.dispatch([(1, 0, 0, b"x")]) == []
    assert [t for t, *_ in deliveries(rings[1])] == [1]


def test_items_may_be_lists_and_short_ones_are_refused(two):
    d, _rings = two
    assert d.dispatch([[1, 0, 0, b"x"]]) == []
    with pytest.raises(
        TypeError, match=r"^a delivery is \(tag, retries, queue index, body\), got \(2, 0, 0\)$"
    ):
        d.dispatch([(2, 0, 0)])
    with pytest.raises(TypeError, match=r"^a delivery is"):
        d.dispatch_to(1, [(3,)])


def test_a_tag_given_twice_is_held_once(two):
    d, _ = two
    d.dispatch_to(0, [(5, 0, 0, b""), (5, 0, 0, b"")])
    assert d.in_flight(0) == 1
    d.complete(0, [done(5)])
    assert d.in_flight(0) == 0
