"""The envelope of a task message, and the one msgpack encoder and decoder that handle it.

A task message's body is a msgpack array ``[id, task, args, enqueued_at, attempt, headers]``.
``args`` stays raw msgpack until the worker decodes it with the task's own typed decoder, so a
payload that does not validate is the task's failure, never the envelope's. No pickle, ever.
"""

from __future__ import annotations

import itertools
import os
import time

import msgspec

from fastq.errors import MessageError

__all__ = ["Envelope", "MessageError", "decode", "encode", "encode_args", "new_id"]


class Envelope(msgspec.Struct, array_like=True, gc=False, frozen=True):
    """One task call in flight: which task, its arguments (raw msgpack), and its history."""

    id: str
    task: str
    args: msgspec.Raw
    enqueued_at: float
    attempt: int = 0
    headers: dict[str, str] | None = None


#: Shared by every call in a process: msgspec encoders and decoders are reusable and thread-safe.
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


_ids = itertools.count()
_id_prefix = os.urandom(8).hex()


def _new_prefix() -> None:
    global _id_prefix
    _id_prefix = os.urandom(8).hex()


os.register_at_fork(after_in_child=_new_prefix)  # a forked child must not repeat our ids


def new_id() -> str:
    """A message id: 32 hex characters, unique without coordination: 64 random bits drawn once
    per process (again in a forked child), then a counter (uuid4 costs a getrandom() call per
    message)."""
    return f"{_id_prefix}{next(_ids) & 0xFFFFFFFFFFFFFFFF:016x}"


def encode_args(args: tuple[object, ...]) -> msgspec.Raw:
    """The positional arguments of a task call as raw msgpack (structs, builtins)."""
    try:
        return msgspec.Raw(_encoder.encode(args))
    except TypeError as e:
        raise MessageError(
            f"task arguments must be msgspec Structs or builtins (no pickle): {e}"
        ) from e


def encode(
    task: str,
    args: tuple[object, ...] | msgspec.Raw,
    *,
    message_id: str | None = None,
    headers: dict[str, str] | None = None,
    enqueued_at: float | None = None,
) -> tuple[str, bytes]:
    """Encode one task call (arguments as values, or already raw); returns ``(message_id,
    body)``. ``enqueued_at``: the unix time it was made (default: now)."""
    message_id = message_id or new_id()
    raw = args if isinstance(args, msgspec.Raw) else encode_args(args)
    when = time.time() if enqueued_at is None else enqueued_at
    envelope = Envelope(message_id, task, raw, when, 0, headers)
    return message_id, _encoder.encode(envelope)


def decode(body: bytes | memoryview) -> Envelope:
    """Decode a body into an Envelope.

    Raises:
        MessageError: the body is not msgpack, or not an envelope (the reason is in words).
    """
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as e:
        head = bytes(body[:16]).hex()
        raise MessageError(
            f"body of {len(body)} bytes is not a fastq task envelope ({e}); it starts with "
            f"0x{head}; send it with task.send(), or consume the queue with @app.consumer"
        ) from e
