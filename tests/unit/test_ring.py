"""The ring's contract, in one process; every test runs on _core and on _core_py."""

from __future__ import annotations

import array
import asyncio
import os
import queue
import select
import threading
import time
from pathlib import Path

import pytest

from fastq.errors import (
    ConfigError,
    FrameTooLarge,
    PeerLost,
    RingBusy,
    RingClosed,
    RingEmpty,
    RingFull,
    RingNotFound,
)
from fastq.testing import wait_until


def wait_for(condition, timeout=5.0):
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    wait_until(condition, timeout, "the condition did not hold in time", interval=0.001)


def consume_in_thread(ring, outcome):
    """Start a thread blocked in ring.get_many; RingClosed lands in ``outcome``."""

    def consume():
        try:
            ring.get_many(timeout=10)
        except RingClosed as e:
            outcome.append(e)

    t = threading.Thread(target=consume)
    t.start()
    wait_for(lambda: ring.statistics().gets_blocked > 0)
    return t


def drain(ring, max_frames=1024):
    out = []
    while True:
        try:
            out += ring.get_many_nowait(max_frames)
        except RingEmpty:
            return out


def test_get_many_returns_frames_in_put_order(make_ring):
    # Given a ring and frames of different sizes
    ring = make_ring(4096)
    frames = [b"a", b"", b"bc" * 50, bytes(range(256))]
    # When they are put in one call
    assert ring.put_many(frames) == 4
    # Then one get returns them, as bytes, in order
    got = ring.get_many()
    assert got == frames
    assert all(type(f) is bytes for f in got)


def test_any_contiguous_bytes_like_object_is_a_frame(make_ring):
    ring = make_ring(4096)
    ints = array.array("i", [1, 2, 3])
    ring.put_many([bytearray(b"xy"), memoryview(b"abcdef")[2:4], ints, b"z"])
    assert ring.get_many() == [b"xy", b"cd", ints.tobytes(), b"z"]


def test_put_many_takes_any_iterable(make_ring):
    ring = make_ring(4096)
    assert ring.put_many(bytes([i]) for i in range(10)) == 10
    assert ring.get_many() == [bytes([i]) for i in range(10)]


def test_a_frame_that_is_not_bytes_like_is_refused_and_nothing_is_written(make_ring):
    ring = make_ring(4096)
    with pytest.raises(
        TypeError,
        match=r"^frame 1 is str, expected bytes or another bytes-like object; encode it first$",
    ):
        ring.put_many([b"ok", "text"])
    with pytest.raises(
        TypeError, match=r"^frame 0 is a non-contiguous buffer; pass a contiguous copy$"
    ):
        ring.put_many([memoryview(b"abcdef")[::2]])
    assert ring.statistics().frames_put == 0


def test_largest_frame_fits_and_one_byte_more_raises_with_both_sizes(make_ring):
    # Given a ring of 1024 bytes: a frame takes its size + 4, rounded up to 8
    ring = make_ring(1024)
    assert ring.max_frame_bytes == 1020
    # Then the largest frame goes through whole
    ring.put(b"x" * 1020)
    assert ring.get() == b"x" * 1020
    # And one more byte is refused before anything of the batch is written
    with pytest.raises(
        FrameTooLarge,
        match=(
            rf"^frame 1 of 1021 bytes exceeds max_frame_bytes=1020 of ring '{ring.name}' "
            r"\(size_bytes=1024\); create the ring with a larger size_bytes or split the payload$"
        ),
    ):
        ring.put_many([b"first", b"x" * 1021])
    assert ring.statistics().frames_put == 1
    assert isinstance(FrameTooLarge("x"), ValueError)


def test_put_many_nowait_writes_the_longest_prefix_that_fits_and_says_how_long(make_ring):
    # Given a ring with room for exactly three 100-byte frames (104 bytes each)
    ring = make_ring(312 + 8)
    frames = [bytes([i]) * 100 for i in range(5)]
    # When five are put without waiting
    with pytest.raises(RingFull, match=r"3 of 5 frames written .* resend frames\[3:\]") as exc:
        ring.put_many_nowait(frames)
    # Then exactly the first three are in the ring, and the exception says so
    assert exc.value.written == 3
    assert isinstance(exc.value, queue.Full)
    assert drain(ring) == frames[:3]
    # And the caller resends the rest
    assert ring.put_many_nowait(frames[exc.value.written :]) == 2
    assert drain(ring) == frames[3:]


def test_put_many_with_timeout_raises_ring_full_after_the_timeout(make_ring):
    ring = make_ring(128)
    ring.put(b"x" * 100)
    started = time.monotonic()
    with pytest.raises(RingFull) as exc:
        ring.put_many([b"y" * 100], timeout=0.2)
    assert exc.value.written == 0
    assert time.monotonic() - started >= 0.2
    assert ring.statistics().puts_blocked == 1


def test_get_many_nowait_on_an_empty_ring_raises_ring_empty(make_ring):
    ring = make_ring()
    with pytest.raises(RingEmpty, match=rf"^ring '{ring.name}' is empty$"):
        ring.get_many_nowait()
    with pytest.raises(queue.Empty):
        ring.get_nowait()


def test_get_many_with_timeout_raises_ring_empty_after_the_timeout(make_ring):
    ring = make_ring()
    started = time.monotonic()
    with pytest.raises(RingEmpty, match=r"stayed empty until the timeout"):
        ring.get_many(timeout=0.2)
    assert time.monotonic() - started >= 0.2
    assert ring.statistics().gets_blocked == 1


def test_get_many_returns_at_most_max_frames(make_ring):
    ring = make_ring()
    ring.put_many([b"%d" % i for i in range(10)])
    assert ring.get_many(3) == [b"0", b"1", b"2"]
    assert ring.get_many_nowait(100) == [b"%d" % i for i in range(3, 10)]


def test_frames_wrap_around_the_end_of_the_buffer_whole(make_ring):
    # Given a 256-byte ring whose head is moved near the end
    ring = make_ring(256)
    ring.put(b"." * 200)
    assert ring.get() == b"." * 200
    # When a frame is longer than what is left before the end
    frame = bytes(range(150))
    ring.put(frame)
    # Then it comes back whole, its payload split across the end and the start
    assert ring.get() == frame
    assert ring.statistics().used_bytes == 0


def test_arguments_out_of_range_are_config_errors(ring_impl, make_ring):
    with pytest.raises(ConfigError, match=r"^size_bytes=10 is outside 64\.\.4294967296"):
        ring_impl.Ring.create(10)
    with pytest.raises(ConfigError, match=r"ring name 'a/b' is not"):
        ring_impl.Ring.create(4096, name="a/b")
    ring = make_ring()
    with pytest.raises(ConfigError, match=r"^timeout must be >= 0 seconds or None, got -1$"):
        ring.get_many(timeout=-1)
    with pytest.raises(ConfigError, match=r"^max_frames must be >= 1, got 0$"):
        ring.get_many_nowait(0)
    with pytest.raises(TypeError, match=r"Ring.create"):
        ring_impl.Ring()


def test_size_is_rounded_up_to_a_multiple_of_eight(make_ring):
    assert make_ring(100).capacity_bytes == 104


def test_attach_by_name_sees_the_frames_of_the_creator(ring_impl, make_ring):
    ring = make_ring(name=f"fqt-attach-{id(ring_impl)}")
    ring.put_many([b"one", b"two"])
    other = ring_impl.Ring.attach(ring.name)
    try:
        assert other.capacity_bytes == ring.capacity_bytes
        assert other.get_many() == [b"one", b"two"]
    finally:
        other.close()


def test_attach_to_an_unknown_name_raises_ring_not_found(ring_impl):
    with pytest.raises(
        RingNotFound, match=r"^no ring named 'fqt-nobody'; create it first or check the name$"
    ):
        ring_impl.Ring.attach("fqt-nobody")


def test_creating_a_name_that_exists_is_refused(ring_impl, make_ring):
    ring = make_ring()
    with pytest.raises(ConfigError, match=rf"^a ring named '{ring.name}' already exists"):
        ring_impl.Ring.create(4096, name=ring.name)


def test_a_second_consumer_or_producer_is_refused(ring_impl, make_ring):
    ring = make_ring()
    ring.put(b"x")
    ring.get()
    other = ring_impl.Ring.attach(ring.name)
    try:
        with pytest.raises(RingBusy, match=r"already has a consumer \(pid \d+\)"):
            other.get_many_nowait()
        with pytest.raises(RingBusy, match=r"already has a producer \(pid \d+\)"):
            other.put(b"y")
    finally:
        other.close()


def test_close_lets_the_consumer_drain_then_raises_ring_closed(ring_impl, make_ring):
    ring = make_ring()
    consumer = ring_impl.Ring.attach(ring.name)
    try:
        ring.put_many([b"a", b"b"])
        ring.close()
        assert consumer.closed
        assert consumer.get_many() == [b"a", b"b"]
        with pytest.raises(RingClosed, match=r"is closed and drained$"):
            consumer.get_many(timeout=5)
        with pytest.raises(RingClosed, match=r"no more frames can be put$"):
            consumer.put(b"c")
    finally:
        consumer.close()
    with pytest.raises(RingClosed, match=r"^this handle of ring .* was closed$"):
        ring.put(b"d")
    ring.close()  # idempotent


def test_close_wakes_a_consumer_blocked_in_another_thread(ring_impl, make_ring):
    ring = make_ring()
    consumer = ring_impl.Ring.attach(ring.name)
    outcome = []
    t = consume_in_thread(consumer, outcome)
    started = time.monotonic()
    ring.close()
    t.join(5)
    consumer.close()
    assert len(outcome) == 1
    assert time.monotonic() - started < 5  # woken, not timed out (the timeout was 10 s)


def test_a_put_from_another_thread_wakes_a_blocked_get(ring_impl, make_ring):
    ring = make_ring()
    producer = ring_impl.Ring.attach(ring.name)
    ring.spin_seconds = 0.0  # go straight to sleep on the wake-up socket
    got = []
    t = threading.Thread(target=lambda: got.extend(ring.get_many(timeout=10)))
    t.start()
    wait_for(lambda: ring.statistics().gets_blocked > 0)
    producer.put_many([b"wake", b"up"])
    t.join(10)
    producer.close()
    assert got == [b"wake", b"up"]


def test_a_blocked_put_resumes_when_the_consumer_frees_room(ring_impl, make_ring):
    ring = make_ring(256)
    consumer = ring_impl.Ring.attach(ring.name)
    frames = [bytes([i]) * 100 for i in range(20)]
    t = threading.Thread(target=lambda: ring.put_many(frames, timeout=10))
    t.start()
    got = []
    while len(got) < 20:
        got += consumer.get_many(timeout=10)
    t.join(10)
    consumer.close()
    assert got == frames
    assert ring.statistics().puts_blocked >= 1


def test_the_wakeup_descriptor_is_written_only_when_the_consumer_asked(make_ring):
    ring = make_ring()
    fd = ring.fileno()
    # Without a request, puts cost no syscall: the descriptor stays quiet
    ring.put(b"1")
    assert select.select([fd], [], [], 0)[0] == []
    # With frames waiting, there is nothing to ask for
    assert ring.request_wakeup() is False
    ring.get_many()
    # Asked on an empty ring, the next put makes it readable, once
    assert ring.request_wakeup() is True
    ring.put(b"2")
    ring.put(b"3")
    assert select.select([fd], [], [], 1)[0] == [fd]
    ring.clear_wakeup()
    assert select.select([fd], [], [], 0)[0] == []
    assert ring.get_many() == [b"2", b"3"]


def test_get_many_async_waits_on_the_loop_and_returns_what_was_put(
    ring_impl, make_ring, monkeypatch
):
    import fastq.ring

    ring = make_ring()
    producer = ring_impl.Ring.attach(ring.name)

    async def main():
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, producer.put_many, [b"a", b"b"])
        first = await fastq.ring.get_many_async(ring, timeout=5)
        with pytest.raises(RingEmpty):
            await fastq.ring.get_many_async(ring, timeout=0.05)
        return first

    try:
        assert asyncio.run(main()) == [b"a", b"b"]
    finally:
        producer.close()


def test_peer_liveness_follows_its_wakeup_address(ring_impl, make_ring):
    ring = make_ring()
    assert not ring.producer_alive() and not ring.consumer_alive()
    other = ring_impl.Ring.attach(ring.name)
    other.fileno()  # takes the consumer end
    assert ring.consumer_alive()
    other.close()
    assert not ring.consumer_alive()


def test_a_consumer_waiting_on_a_producer_that_went_away_gets_peer_lost(ring_impl, make_ring):
    ring = make_ring()
    producer = ring_impl.Ring.attach(ring.name)
    producer.put(b"x")
    ring.get()
    # The producer's handle disappears without close() (as when its process dies)
    del producer
    import gc

    gc.collect()
    started = time.monotonic()
    with pytest.raises(PeerLost, match=r"^the producer of ring .* \(pid \d+\) is gone$"):
        ring.get_many(timeout=5)
    assert time.monotonic() - started < 5


def test_statistics_count_frames_bytes_and_peers(make_ring):
    ring = make_ring(1024)
    ring.put_many([b"x" * 10, b"y" * 20])
    s = ring.statistics()
    assert (s.frames, s.frames_put, s.frames_got, s.used_bytes) == (2, 2, 0, 16 + 24)
    assert s.capacity_bytes == 1024 and s.peak_used_bytes == 40 and not s.closed
    ring.get_many(1)
    s = ring.statistics()
    assert (s.frames, s.frames_got, s.used_bytes, s.peak_used_bytes) == (1, 1, 24, 40)
    assert s.producer_pid == s.consumer_pid > 0


def test_unlink_removes_the_segment_and_a_with_block_unlinks_for_the_creator(ring_impl):
    ring = ring_impl.Ring.create(4096)
    path = Path("/dev/shm") / ring.name
    assert path.exists()
    ring.close()
    ring.unlink()
    ring.unlink()  # idempotent
    assert not path.exists()
    with pytest.raises(RuntimeError), ring_impl.Ring.create(4096) as ring:
        path = Path("/dev/shm") / ring.name
        raise RuntimeError("the creator fails")
    assert not path.exists()


def test_names_are_limited_so_the_wakeup_address_fits(ring_impl, make_ring):
    assert make_ring(name="fqt-" + "n" * 86).name == "fqt-" + "n" * 86
    with pytest.raises(ConfigError, match=r"is not 1-90 characters"):
        ring_impl.Ring.create(4096, name="fqt-" + "n" * 87)


def test_close_from_a_signal_handler_during_a_wait_ends_the_wait_with_ring_closed(make_ring):
    import signal

    ring = make_ring()
    ring.spin_seconds = 0.0
    old = signal.signal(signal.SIGALRM, lambda *a: ring.close())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(RingClosed):
            ring.get_many(timeout=5)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert ring.closed
    with pytest.raises(RingClosed, match=r"^this handle of ring .* was closed$"):
        ring.statistics()


def test_closing_the_same_handle_from_another_thread_ends_its_wait(make_ring):
    ring = make_ring()
    ring.spin_seconds = 0.0
    outcome = []
    t = consume_in_thread(ring, outcome)
    # A second thread on the same end of the same handle is refused while the first waits
    with pytest.raises(RingBusy, match=r"^another thread is already the consumer on this handle"):
        ring.get_many_nowait()
    ring.close()
    t.join(5)
    assert len(outcome) == 1 and not t.is_alive()


def test_a_huge_max_frames_is_capped_not_allocated(make_ring):
    ring = make_ring(1 << 20)
    ring.put_many([b""] * 70_000)  # 8 bytes each
    got = ring.get_many(2**62)
    assert len(got) == 65_536
    assert len(ring.get_many(2**62)) == 70_000 - 65_536
    with pytest.raises(TypeError):
        ring.get_many(2.5)


def test_frames_before_a_corrupt_length_are_delivered_then_the_corruption_is_reported(
    ring_impl, make_ring
):
    import _posixshmem
    import mmap

    from fastq import _layout
    from fastq.errors import RingCorrupt

    ring = make_ring(1024)
    ring.put_many([b"good", b"also good", b"victim"])
    fd = _posixshmem.shm_open("/" + ring.name, os.O_RDWR, 0)
    try:
        with mmap.mmap(fd, _layout.HEADER_BYTES + 1024) as raw:
            # The third frame starts after records of 8 and 16 bytes; give it an impossible length
            _layout.FRAME_HEADER.pack_into(raw, _layout.HEADER_BYTES + 24, 999)
            assert ring.get_many() == [b"good", b"also good"]
            with pytest.raises(
                RingCorrupt,
                match=r"holds a frame of 999 bytes at offset 24 but only 16 bytes are unread",
            ):
                ring.get_many_nowait()
            # A head that moved by less than one record is reported too, not read as "no frames"
            tail = int.from_bytes(raw[_layout.SLOT_TAIL * 8 : _layout.SLOT_TAIL * 8 + 8], "little")
            raw[_layout.SLOT_HEAD * 8 : _layout.SLOT_HEAD * 8 + 8] = (tail + 4).to_bytes(
                8, "little"
            )
            with pytest.raises(RingCorrupt):
                ring.get_many_nowait()
    finally:
        os.close(fd)


def test_liveness_can_be_asked_on_a_closed_handle(ring_impl, make_ring):
    ring = make_ring()
    other = ring_impl.Ring.attach(ring.name)
    other.fileno()
    ring.close()
    assert ring.consumer_alive() is True
    assert ring.producer_alive() is False
    other.close()
    assert ring.consumer_alive() is False


def test_a_reader_that_is_not_armed_takes_a_stray_wake_up_instead_of_spinning(make_ring):
    import fastq.ring
    from fastq._layout import CONSUMER, wakeup_address
    from fastq._segment import send_wakeup

    ring = make_ring()
    got: list[bytes] = []
    calls = 0

    async def main() -> None:
        nonlocal calls
        # Given a reader whose owner polls (never armed), and a wake-up nobody asked for
        reader = fastq.ring.RingReader(ring, got.extend, arm_when=lambda: False)
        original = reader._readable

        def counted() -> None:
            nonlocal calls
            calls += 1
            original()

        reader._readable = counted  # type: ignore[method-assign]
        reader.start()
        send_wakeup(wakeup_address(ring.name, CONSUMER))
        # When the loop runs a while
        await asyncio.sleep(0.1)
        reader.stop()

    asyncio.run(main())
    # Then the descriptor was read once, not once per loop iteration
    assert calls == 1


def test_a_reader_whose_handler_fails_stops_and_says_so(make_ring):
    import fastq.ring

    ring = make_ring()
    errors: list[BaseException] = []

    def broken(frames: list[bytes]) -> None:
        raise KeyError("a bug")

    async def main() -> None:
        reader = fastq.ring.RingReader(ring, broken, on_error=errors.append)
        reader.start()
        ring.put(b"x")
        await asyncio.sleep(0.05)
        ring.put(b"y")  # nobody reads on: the failure stopped the stream, loudly
        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert [type(e) for e in errors] == [KeyError]
    assert ring.get_many_nowait() == [b"y"]
