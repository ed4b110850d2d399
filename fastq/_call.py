"""``fastq.Pool`` batches on the wire, and the worker side that runs them.

A request is one ring frame: a msgpack array ``[codec, flags, fn, item type, items]``; a reply
is ``[codec, item type, results, errors]`` in a completion frame of status ``RESULT``, whose
delay field carries the seconds the batch took in the worker (the caller sizes batches from it).

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

import asyncio
import concurrent.futures
import functools
import inspect
import pickle
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgspec

from fastq.errors import RemoteError
from fastq.ring import plain_values

MSGPACK, STRUCT, PICKLE = 0, 1, 2
#: flags: each item is ``(args, kwargs)`` (submit), not one argument (map)
STAR = 1
#: flags: a plain function runs in the worker's threads, ``concurrency`` at once (kind="io")
THREADS = 2
#: the completion status of a pool reply (STATUS_OK frames carry no payload to the caller)
RESULT = 5
#: an error record's index for "every item of the batch" (fn could not be loaded, say)
WHOLE_BATCH = -1
_NOT_MSGPACK = (TypeError, OverflowError, ValueError, UnicodeError)

_encoder = msgspec.msgpack.Encoder()
_head = msgspec.msgpack.Decoder(tuple[int, int, bytes, bytes, msgspec.Raw])
_reply_head = msgspec.msgpack.Decoder(tuple[int, bytes, msgspec.Raw, list[tuple[int, bytes, str, str, str]]])
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
    raise ValueError(f"unknown codec {codec} in a pool frame: the caller and the worker run different fastq versions")


# -- the caller's side ----------------------------------------------------------------------------

def encode_request(fn_ref: bytes, flags: int, items: list[Any]) -> bytes:
    """One batch of calls as a frame body.

    Raises:
        TypeError: an argument can be neither msgpack'd nor pickled; the message names it.
    """
    try:
        return encode(items, [flags, fn_ref], [], True)
    except Exception as e:  # noqa: BLE001 - pickle raises many types
        bad = next((x for x in items if not _picklable(x)), None)
        raise TypeError(f"an argument of type {type(bad).__name__} cannot be sent to a pool worker ({e}); "
                        f"pass builtins, bytes, msgspec Structs or picklable objects") from None


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


def decode_reply(payload: bytes) -> tuple[list[Any], list[tuple[int, BaseException]]]:
    """The results of a batch, and ``(index, exception)`` for the items that raised, in item
    order; ``[]`` and one WHOLE_BATCH error when the results cannot be rebuilt here."""
    codec, type_ref, raw, records = _reply_head.decode(payload)
    try:
        values = decode_values(codec, type_ref, raw)
    except Exception as e:  # noqa: BLE001 - a class this process lacks, an __init__ that refuses...
        error = RemoteError(f"the results came back but cannot be rebuilt in the caller: {type(e).__name__}: {e}")
        error.__cause__ = e
        return [], [(WHOLE_BATCH, error)]
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
    return values, errors


# -- the worker's side ----------------------------------------------------------------------------

def _record(index: int, e: BaseException) -> tuple[int, bytes, str, str, str]:
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


def encode_reply(values: list[Any], errors: list[tuple[int, bytes, str, str, str]], max_bytes: int) -> bytes:
    """The reply frame body: results and error records (in item order), at most ``max_bytes``;
    items whose results make it larger fail with an error that says so."""
    errors.sort(key=lambda r: r[0])
    try:
        body = encode(values, [], [errors], False)
    except Exception:  # noqa: BLE001 - some result cannot be pickled: that item fails, not all
        for i, v in enumerate(values):
            if not _picklable(v):
                values[i] = None
                errors.append(_record(i, TypeError(
                    f"fn returned a {type(v).__name__}, which cannot travel back to the caller; "
                    f"return builtins, bytes, msgspec Structs or picklable objects")))
        errors.sort(key=lambda r: r[0])
        body = encode(values, [], [errors], False)
    if len(body) <= max_bytes:
        return body
    # Too large for the ring: every item fails, with the size (the caller sizes its batches by
    # the reply bytes it has seen, so this is one result larger than the ring, or the first batch)
    e = ValueError(f"the results of this batch take {len(body)} bytes, more than the pool's ring holds "
                   f"({max_bytes} bytes); make the Pool with a larger ring_bytes= or return less")
    return encode([None] * len(values), [], [[_record(i, e) for i in range(len(values))]], False)


class PoolExecutor:
    """Runs ``fastq.Pool`` batches in a worker (``WorkerSpec.executor``): a plain function
    inline, item after item; an ``async def`` on the loop, up to ``concurrency`` items at once
    across all the batches this worker holds."""

    #: each frame is a whole batch that its caller waits for: report it at once
    flush_each = True

    def __init__(self, runtime: Any) -> None:
        self.concurrency = max(1, runtime.spec.concurrency)
        #: a reply frame must fit the output ring with its completion header
        self.max_reply_bytes = runtime.outbox.max_frame_bytes - 64
        #: batches at once: enough for the caller's window of async batches to all be started
        self.slots = 2 * self.concurrency + 8
        self.fns: dict[bytes, tuple[Any, bool]] = {}
        self.limit: asyncio.Semaphore | None = None
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    def threads(self) -> concurrent.futures.ThreadPoolExecutor:
        if self.pool is None:
            self.pool = concurrent.futures.ThreadPoolExecutor(self.concurrency, thread_name_prefix="fastq-pool")
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def load(self, fn_ref: bytes) -> tuple[Any, bool]:
        loaded = self.fns.get(fn_ref)
        if loaded is None:
            fn = pickle.loads(fn_ref)
            loaded = self.fns[fn_ref] = (fn, inspect.iscoroutinefunction(fn))
        return loaded

    async def run(self, body: memoryview, retries: int, queue_index: int) -> tuple[int, float, bytes]:
        started = time.perf_counter()
        values: list[Any] = []
        errors: list[tuple[int, bytes, str, str, str]] = []
        try:
            codec, flags, fn_ref, type_ref, raw = _head.decode(body)
            items = decode_values(codec, type_ref, raw)
            fn, is_async = self.load(fn_ref)
        except Exception as e:  # noqa: BLE001 - fn not importable here, a codec of another version...
            errors.append(_record(WHOLE_BATCH, e))
        else:
            if is_async or flags & THREADS:
                values = await self.run_async(fn, items, flags & STAR, errors, threaded=not is_async)
            else:
                values = run_sync(fn, items, flags & STAR, errors)
        payload = encode_reply(values, errors, self.max_reply_bytes)
        return RESULT, time.perf_counter() - started, payload

    async def run_async(self, fn: Any, items: list[Any], star: int,
                        errors: list[tuple[int, bytes, str, str, str]], threaded: bool) -> list[Any]:
        if self.limit is None:
            self.limit = asyncio.Semaphore(self.concurrency)
        limit = self.limit
        values: list[Any] = [None] * len(items)
        loop = asyncio.get_running_loop()

        async def one(i: int, x: Any) -> None:
            async with limit:
                try:
                    if threaded:
                        call = functools.partial(fn, *x[0], **x[1]) if star else functools.partial(fn, x)
                        ok, value = await loop.run_in_executor(self.threads(), _guarded, call)
                        if not ok:
                            raise value
                        values[i] = value
                    else:
                        values[i] = await (fn(*x[0], **x[1]) if star else fn(x))
                except BaseException as e:
                    if isinstance(e, asyncio.CancelledError) and asyncio.current_task().cancelling():  # type: ignore[union-attr]
                        raise  # the worker itself is being stopped
                    errors.append(_record(i, e))

        await asyncio.gather(*[one(i, x) for i, x in enumerate(items)])
        return values


def _guarded(call: Callable[[], Any]) -> tuple[bool, Any]:
    """Run ``call`` in a thread, its exception returned as a value: an asyncio future cannot
    carry StopIteration, and a BaseException would escape the executor's bookkeeping."""
    try:
        return True, call()
    except BaseException as e:  # noqa: BLE001 - handed to the item
        return False, e


def run_sync(fn: Any, items: list[Any], star: int, errors: list[tuple[int, bytes, str, str, str]]) -> list[Any]:
    """``fn`` over ``items`` in order; an item that raises gets None and an error record, and
    the loop goes on with the next (each item runs exactly once)."""
    values: list[Any] = []
    it = iter(items)
    while True:
        try:
            if star:
                for args, kwargs in it:
                    values.append(fn(*args, **kwargs))
            else:
                # list.extend keeps what map gave before an exception, and map has taken the item
                # that raised from ``it``: the loop goes on after it
                values.extend(map(fn, it))
                if len(values) < len(items):  # fn raised StopIteration, which ends map quietly
                    errors.append(_record(len(values), StopIteration("fn raised StopIteration")))
                    values.append(None)
                    continue
            return values
        except BaseException as e:  # noqa: BLE001 - whatever fn raised is the item's outcome
            errors.append(_record(len(values), e))
            values.append(None)
