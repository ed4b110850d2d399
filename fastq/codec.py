"""``fastq.Pool``'s values on the wire: the codec of a batch's items and results, and the
frames that carry them.

A request is one delivery frame: a msgpack array ``[codec, flags, fn, item type, items]``; a
reply is ``[codec, seconds, item type, results, errors]`` in a completion frame of status
``RESULT``, where ``seconds`` is the worker time the batch took (the caller sizes batches from
it).

Codecs, chosen per batch from the types actually in it, so that a value comes back as the
same type it left as:

- ``MSGPACK``: every item is an int (64-bit), float, str, bytes, bool or None; arguments may
  also be memoryviews (they arrive as bytes). No pickle, and bytes go through as raw bin.
- ``STRUCT``: every item is an instance of one ``msgspec.Struct`` type (or None), decoded as
  that type by its annotations.
- ``PICKLE`` (protocol 5): anything else. A pool never leaves one host and one user, unlike a
  broker message, which is never pickled (ARCHITECTURE.md, invariant 5).

``fn`` travels as its pickle, which names a module-level function by reference (as
``multiprocessing`` does); the worker caches what it loaded.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any

import msgspec

from fastq.errors import RemoteError
from fastq.ring import plain_values

MSGPACK, STRUCT, PICKLE = 0, 1, 2
#: flags: each item is ``(args, kwargs)`` (submit), not one argument (map)
STAR = 1
#: flags: a plain function runs in the worker's threads, ``concurrency`` at once (kind="io")
THREADS = 2
#: an error record's index for "every item of the batch" (fn could not be loaded, say)
WHOLE_BATCH = -1
_NOT_MSGPACK = (TypeError, OverflowError, ValueError, UnicodeError)

#: one item that raised: (index, the exception pickled or b"", type name, message, traceback)
ErrorRecord = tuple[int, bytes, str, str, str]

_encoder = msgspec.msgpack.Encoder()
_head = msgspec.msgpack.Decoder(tuple[int, int, bytes, bytes, msgspec.Raw])
_reply_head = msgspec.msgpack.Decoder(tuple[int, float, bytes, msgspec.Raw, list[ErrorRecord]])
_by_type: dict[bytes, msgspec.msgpack.Decoder[Any]] = {}


def _struct_type(types: set[type]) -> type | None:
    """The one Struct type of a batch (None may stand beside it), if it may go as msgpack:
    one without ``__post_init__`` (decoding would run it again)."""
    types = types - {type(None)}
    if len(types) == 1:
        (t,) = types
        if issubclass(t, msgspec.Struct) and not hasattr(t, "__post_init__"):
            return t
    return None


def _typed(type_ref: bytes) -> msgspec.msgpack.Decoder[Any]:
    decoder = _by_type.get(type_ref)
    if decoder is None:
        decoder = _by_type[type_ref] = msgspec.msgpack.Decoder(list[pickle.loads(type_ref) | None])  # type: ignore[misc]
    return decoder


def encode(values: list[Any], head: list[Any], tail: list[Any], buffers: bool) -> bytes:
    """``[codec, *head, item type, values, *tail]`` as msgpack, with the codec the values allow.

    Structs go as msgpack when decoding them by their annotations gives them back equal (checked
    here, on the sending side: a field typed ``Any`` holding a tuple, or a bool in an int field,
    would not be); otherwise pickled.

    Raises:
        pickle.PicklingError, TypeError, AttributeError: a value cannot travel at all.
    """
    if plain_values(values, buffers):
        try:
            return _encoder.encode([MSGPACK, *head, b"", values, *tail])
        except _NOT_MSGPACK:  # an int past 64 bits, a lone surrogate...
            pass
    elif (t := _struct_type(set(map(type, values)))) is not None:
        type_ref = pickle.dumps(t, 5)
        try:
            if _typed(type_ref).decode(_encoder.encode(values)) == values:
                return _encoder.encode([STRUCT, *head, type_ref, values, *tail])
        except (*_NOT_MSGPACK, msgspec.ValidationError):  # a field msgpack cannot carry
            pass
    return _encoder.encode([PICKLE, *head, b"", pickle.dumps(values, 5), *tail])


def decode_values(codec: int, type_ref: bytes, raw: msgspec.Raw) -> list[Any]:
    if codec == MSGPACK:
        return msgspec.msgpack.decode(raw)  # type: ignore[no-any-return]
    if codec == STRUCT:
        return _typed(type_ref).decode(raw)  # type: ignore[no-any-return]
    if codec == PICKLE:
        return pickle.loads(msgspec.msgpack.decode(raw, type=bytes))  # type: ignore[no-any-return]
    raise ValueError(
        f"unknown codec {codec} in a pool frame: the caller and the worker run different fastq "
        "versions"
    )


# -- the caller's side ----------------------------------------------------------------------------


def encode_request(fn_ref: bytes, flags: int, items: list[Any]) -> bytes:
    """One batch of calls as a frame body.

    Raises:
        TypeError: an argument can be neither msgpack'd nor pickled; the message names it.
    """
    try:
        return encode(items, [flags, fn_ref], [], True)
    except Exception as e:
        bad = next((x for x in items if not _picklable(x)), None)
        raise TypeError(
            f"an argument of type {type(bad).__name__} cannot be sent to a pool worker ({e}); "
            f"pass builtins, bytes, msgspec Structs or picklable objects"
        ) from e


def decode_request(body: bytes | memoryview) -> tuple[int, bytes, list[Any]]:
    """The flags, the function's pickle and the items of a request.

    Raises:
        Exception: the frame or its values do not decode here (another fastq version, a class
            this process cannot import...).
    """
    codec, flags, fn_ref, type_ref, raw = _head.decode(body)
    return flags, fn_ref, decode_values(codec, type_ref, raw)


def _picklable(x: Any) -> bool:
    try:
        pickle.dumps(x, 5)
    except Exception:  # noqa: BLE001
        return False
    return True


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a pool worker (set as ``__cause__``)."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


def decode_reply(payload: bytes) -> tuple[float, list[Any], list[tuple[int, BaseException]]]:
    """The worker seconds a batch took, its results, and ``(index, exception)`` for the items
    that raised, in item order; ``[]`` and one WHOLE_BATCH error when the results cannot be
    rebuilt here."""
    codec, seconds, type_ref, raw, records = _reply_head.decode(payload)
    try:
        values = decode_values(codec, type_ref, raw)
    except Exception as e:  # noqa: BLE001 - a class this process lacks, an __init__ that refuses...
        error = RemoteError(
            f"the results came back but cannot be rebuilt in the caller: {type(e).__name__}: {e}"
        )
        error.__cause__ = e
        return seconds, [], [(WHOLE_BATCH, error)]
    errors: list[tuple[int, BaseException]] = []
    for index, exc_bytes, name, message, tb in records:
        exc: BaseException | None = None
        if exc_bytes:
            try:
                exc = pickle.loads(exc_bytes)
            except Exception:  # noqa: BLE001 - a class this process cannot import, say
                exc = None
        if not isinstance(exc, BaseException):
            exc = RemoteError(f"{name}: {message}")
        exc.__cause__ = RemoteTraceback(tb)
        errors.append((index, exc))
    return seconds, values, errors


# -- the worker's side ----------------------------------------------------------------------------


def error_record(index: int, e: BaseException) -> ErrorRecord:
    """What goes back of an exception an item raised: itself, pickled when it can be, and its
    text, which always can."""
    try:
        exc_bytes = pickle.dumps(e, 5)
    except Exception:  # noqa: BLE001 - the text still goes back
        exc_bytes = b""
    tb = "".join(traceback.format_exception(e))
    return index, exc_bytes, _text(type(e).__qualname__), _text(_str(e)), _text(tb)


def _str(e: BaseException) -> str:
    try:
        return str(e)
    except Exception as inner:  # noqa: BLE001 - a __str__ that raises
        return f"<str() failed: {type(inner).__name__}>"


def _text(s: str) -> str:
    """``s`` as valid UTF-8 (a lone surrogate becomes an escape), which msgpack can carry."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def encode_reply(
    seconds: float, values: list[Any], errors: list[ErrorRecord], max_bytes: int
) -> bytes:
    """The reply frame body: the worker seconds the batch took, its results and error records
    (in item order), at most ``max_bytes``; items whose results make it larger fail with an
    error that says so."""
    errors.sort(key=lambda r: r[0])
    try:
        body = encode(values, [seconds], [errors], False)
    except Exception:  # noqa: BLE001 - some result cannot be pickled: that item fails, not all
        for i, v in enumerate(values):
            if not _picklable(v):
                values[i] = None
                errors.append(
                    error_record(
                        i,
                        TypeError(
                            f"fn returned a {type(v).__name__}, which cannot travel back to the "
                            "caller; "
                            f"return builtins, bytes, msgspec Structs or picklable objects"
                        ),
                    )
                )
        errors.sort(key=lambda r: r[0])
        body = encode(values, [seconds], [errors], False)
    if len(body) <= max_bytes:
        return body
    # Too large for the ring: every item fails, with the size (the caller sizes its batches by
    # the reply bytes it has seen, so this is one result larger than the ring, or the first batch)
    e = ValueError(
        f"the results of this batch take {len(body)} bytes, more than the pool's ring holds "
        f"({max_bytes} bytes); make the Pool with a larger ring_bytes= or return less"
    )
    return encode(
        [None] * len(values), [seconds], [[error_record(i, e) for i in range(len(values))]], False
    )
