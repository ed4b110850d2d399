"""Random sequences of puts and gets against a deque model, on both implementations."""

from __future__ import annotations

import collections

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastq.errors import RingEmpty, RingFull

CAPACITY = 256  # small, so that runs cross the wrap-around and the full ring all the time
MAX_FRAME = CAPACITY - 4

frames = st.binary(min_size=0, max_size=MAX_FRAME)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.lists(frames, min_size=1, max_size=6)),
        st.tuples(st.just("get"), st.integers(min_value=1, max_value=8)),
    ),
    max_size=60,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=ops)
def test_random_puts_and_gets_behave_like_a_deque(ring_impl, ops):
    ring = ring_impl.Ring.create(CAPACITY)
    model: collections.deque[bytes] = collections.deque()
    used = 0
    try:
        for op, arg in ops:
            if op == "put":
                # The model: frames go in while they fit, the first that does not stops the batch
                fits = 0
                for f in arg:
                    rec = (4 + len(f) + 7) & ~7
                    if used + rec > CAPACITY:
                        break
                    used += rec
                    fits += 1
                try:
                    assert ring.put_many_nowait(arg) == len(arg) == fits
                except RingFull as e:
                    assert e.written == fits < len(arg)
                model.extend(arg[:fits])
            else:
                want = [model.popleft() for _ in range(min(arg, len(model)))]
                used -= sum((4 + len(f) + 7) & ~7 for f in want)
                try:
                    assert ring.get_many_nowait(arg) == want
                except RingEmpty:
                    assert want == []
            s = ring.statistics()
            assert (s.used_bytes, s.frames) == (used, len(model))
    finally:
        ring.close()
        ring.unlink()
