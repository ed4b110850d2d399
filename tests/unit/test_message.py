"""Envelopes: msgpack, typed arguments decoded by the task, garbage refused in words."""

from __future__ import annotations

import msgspec
import pytest

from fastq import message


class Point(msgspec.Struct):
    x: int
    y: int


def test_an_envelope_round_trips_with_its_raw_arguments():
    mid, body = message.encode("move", (Point(1, 2), "fast"), headers={"trace": "t1"})
    env = message.decode(body)
    assert (env.id, env.task, env.attempt, env.headers) == (mid, "move", 0, {"trace": "t1"})
    assert msgspec.msgpack.decode(env.args, type=tuple[Point, str]) == (Point(1, 2), "fast")
    assert len(mid) == 32


def test_a_body_that_is_not_an_envelope_is_refused_with_its_first_bytes():
    with pytest.raises(
        message.MessageError,
        match=r"^body of 5 bytes is not a fastq task envelope \(.*\); it starts with 0x68656c6c6f; "
        r"",
    ):
        message.decode(b"hello")
    assert issubclass(message.MessageError, ValueError)


def test_arguments_that_would_need_pickle_are_refused():
    with pytest.raises(
        message.MessageError,
        match=r"^task arguments must be msgspec Structs or builtins \(no pickle\)",
    ):
        message.encode("t", (object(),))


def test_message_ids_are_unique_and_a_forked_child_draws_its_own():
    import os

    from fastq.message import new_id

    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000 and all(len(i) == 32 for i in ids)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child writes one id and leaves at once
        os.write(w, new_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(r, 64).decode()
    os.close(r)
    os.close(w)
    assert child[:16] != new_id()[:16]
