"""A worker serving several queues keeps each queue's frames in a lane of its own, with slots
of its own: one queue's deep backlog here does not keep another's frames from a slot."""

from __future__ import annotations

from fastq.ring import DELIVERY
from fastq.worker import Lanes


def frame(tag: int, queue: int) -> bytes:
    return DELIVERY.pack(tag, 0, queue) + b"body"


def test_frames_start_in_turn_within_each_queues_slots():
    # Given 400 frames of queue 0 waiting ahead of 3 of queue 1, and slots 50 and 1
    lanes = Lanes([50, 1])
    lanes.extend([frame(t, 0) for t in range(1, 401)] + [frame(t, 1) for t in range(401, 404)])
    assert len(lanes) == 403
    # Then queue 1's first frame starts second, not after the 400, and only one of it at once
    started = [lanes.take() for _ in range(51)]
    queues = [DELIVERY.unpack_from(f)[2] for f in started]
    assert queues[:2] == [0, 1] and queues.count(1) == 1 and queues.count(0) == 50
    assert lanes.take() is None  # every queue with frames is at its slots
    lanes.done(1)
    assert DELIVERY.unpack_from(lanes.take())[2] == 1  # its next frame, at once
    assert len(lanes) == 403 - 52


def test_room_says_when_reading_more_could_fill_a_slot_and_resize_keeps_one_for_leftovers():
    lanes = Lanes([2, 0])  # a queue that may not run here keeps one slot for what it has
    assert lanes.slots == [2, 1] and lanes.room()
    lanes.extend([frame(1, 0), frame(2, 0), frame(3, 1)])
    assert not lanes.room()  # every free slot has a frame waiting for it
    lanes.resize([4, 1])
    assert lanes.room() and lanes.free == [4, 1]
    assert [DELIVERY.unpack_from(lanes.take())[0] for _ in range(3)] == [1, 3, 2]
    lanes.resize([1, 0])  # fewer slots than are busy: the next frames wait for completions
    assert lanes.free == [-1, 0] and lanes.take() is None


def test_a_queue_that_runs_elsewhere_now_does_not_keep_the_reader_armed():
    lanes = Lanes([3, 0])
    lanes.extend([frame(1, 0), frame(2, 0), frame(3, 0)])
    assert not lanes.room()  # queue 1 may not run here: its floor slot is for leftovers only
    lanes.resize([3, 2])
    assert lanes.room()
