"""What a handler returned, as it is kept for whoever asks: an ``Outcome``, msgpack, no pickle.

The worker encodes the outcome (the return value typed by the handler's return annotation, or
the failure with its remote traceback as text); the supervisor stores the bytes as they are, in
the same transaction as the ack where the store is the broker's own file; ``task.result()``
decodes them with the task's return type.

Headers a producer may put on a task message (``task.call`` does):

- ``fastq-keep``: seconds to keep this message's result when its task keeps none
  (``result_ttl`` unset): the caller is waiting for it.
- ``fastq-notify``: the caller's wake-up address (``fastq._notify``): the supervisor pokes it
  once the result is stored, so that the caller does not poll.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import msgspec

from fastq import _notify
from fastq.errors import ResultExpired, TaskFailed

__all__ = [
    "KEEP",
    "NOTIFY",
    "Outcome",
    "ResultExpired",
    "TaskFailed",
    "failure",
    "read",
    "success",
    "wait",
    "wait_async",
]

KEEP = "fastq-keep"
NOTIFY = "fastq-notify"
#: msgpack's nil: the value of a handler that returned None
NIL = b"\xc0"


class Outcome(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One handler's outcome as it is stored."""

    ok: bool
    #: the return value, msgpack (nil when it failed)
    value: msgspec.Raw
    #: wall-clock seconds when the worker finished it
    finished_at: float
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    #: the dead letter's reason (what failed, after how many attempts)
    reason: str = ""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Outcome)


def success(value: bytes) -> bytes:
    """The stored form of a return value already encoded as msgpack."""
    return _encoder.encode(Outcome(True, msgspec.Raw(value), time.time()))


def failure(error_type: str, error_message: str, traceback: str, reason: str) -> bytes:
    """The stored form of a failure for good."""
    return _encoder.encode(
        Outcome(False, msgspec.Raw(NIL), time.time(), error_type, error_message, traceback, reason)
    )


def read(
    stored: bytes, decoder: msgspec.msgpack.Decoder[Any], *, message_id: str, task: str
) -> Any:
    """The value of a stored outcome, decoded by ``decoder`` (the task's return type).

    Raises:
        TaskFailed: the task failed for good; the remote type, message and traceback are in it.
        msgspec.ValidationError: the value does not fit the return type (a producer of another
            version of the task wrote it); the message says where.
    """
    outcome = _decoder.decode(stored)
    if not outcome.ok:
        raise TaskFailed(
            message_id,
            task,
            outcome.error_type,
            outcome.error_message,
            outcome.traceback,
            outcome.reason,
        )
    try:
        return decoder.decode(outcome.value)
    except msgspec.ValidationError as e:
        raise msgspec.ValidationError(
            f"the result of {task} (message {message_id}) does not fit its return type: {e}"
        ) from e


def unexpired(message_id: str, outcome: bytes | None, expires_at: float) -> bytes:
    """A kept outcome as a store read it (``None``: a tombstone), checked for expiry on read.

    Raises:
        ResultExpired: its ttl passed.
    """
    if outcome is None or expires_at < time.time():
        raise expired(message_id, expires_at)
    return bytes(outcome)


def expired(message_id: str, expired_at: float) -> ResultExpired:
    ago = max(0.0, time.time() - expired_at)
    return ResultExpired(
        f"the result of message {message_id} expired {ago:.1f} s ago (result_ttl passed); "
        "read it sooner, or give the task a longer result_ttl"
    )


#: seconds between looks at the store for a result that no wake-up will announce (a message
#: another process sent): at most 20 reads a second
POLL = 0.05


class Store(Protocol):
    """Where results are read (a broker that keeps them)."""

    url: str

    def get_result(self, message_id: str) -> bytes | None: ...


def _timed_out(message_id: str, task: str, timeout: float) -> TimeoutError:
    return TimeoutError(
        f"no result for message {message_id} of {task} within {timeout:g} s: it is still queued "
        "or running (or this store never saw that id); wait longer, or check that a worker "
        "consumes its queue"
    )


def _look(
    store: Store,
    message_id: str,
    decoder: msgspec.msgpack.Decoder[Any],
    task: str,
    timeout: float | None,
    left: float | None,
    pause: float,
) -> tuple[bool, Any, float]:
    """One look at the store: ``(found, value, seconds to wait before the next look)``; ``left``
    is the time left of ``timeout`` (None: no timeout)."""
    stored = store.get_result(message_id)
    if stored is not None:
        return True, read(stored, decoder, message_id=message_id, task=task), 0.0
    if left is not None and left <= 0:
        raise _timed_out(message_id, task, timeout or 0.0)
    return False, None, pause if left is None else min(pause, left)


def wait(
    store: Store,
    message_id: str,
    decoder: msgspec.msgpack.Decoder[Any],
    task: str,
    timeout: float | None,
    *,
    announced: bool,
) -> Any:
    """Wait for and decode the result of ``message_id``: a look at the store every POLL, or
    only every ``_notify.FALLBACK`` when it is ``announced`` (the message names this process's
    wake-up address, so its supervisor pokes us); a poke wakes the waiter at once either way."""
    listener = _notify.listener() if announced else _notify.current()
    waiter = listener.expect(message_id) if listener is not None else None
    deadline = None if timeout is None else time.monotonic() + timeout
    pause = _notify.FALLBACK if announced else POLL
    try:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            found, value, sleep = _look(store, message_id, decoder, task, timeout, left, pause)
            if found:
                return value
            if waiter is not None and waiter.event is not None:
                waiter.event.wait(sleep)
                waiter.event.clear()
            else:
                time.sleep(sleep)
    finally:
        if listener is not None and waiter is not None:
            listener.done(message_id, waiter)


async def wait_async(
    store: Store,
    message_id: str,
    decoder: msgspec.msgpack.Decoder[Any],
    task: str,
    timeout: float | None,
    *,
    announced: bool,
) -> Any:
    """``wait`` for coroutines: the loop is free while it waits."""
    loop = asyncio.get_running_loop()
    listener = _notify.listener() if announced else _notify.current()
    deadline = None if timeout is None else loop.time() + timeout
    pause = _notify.FALLBACK if announced else POLL
    while True:
        waiter = listener.expect(message_id, loop) if listener is not None else None
        try:
            left = None if deadline is None else deadline - loop.time()
            found, value, sleep = _look(store, message_id, decoder, task, timeout, left, pause)
            if found:
                return value
            if waiter is not None and waiter.future is not None:
                await asyncio.wait({waiter.future}, timeout=sleep)
            else:
                await asyncio.sleep(sleep)
        finally:
            if listener is not None and waiter is not None:
                listener.done(message_id, waiter)
