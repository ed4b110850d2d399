"""The supervisor <-> worker protocol: every frame that crosses the rings, named.

Both sides import this module; neither imports the other (the supervisor names the worker's
entry point only as the target it spawns).

Supervisor -> worker (the input ring):

- a **delivery**: ``DELIVERY`` header (tag >= 1, attempt, queue index), then the message body.
  The dispatcher in the Cython core writes these; ``delivery_queue`` reads the queue index back.
- a **control frame**: ``CONTROL`` header (tag 0, a ``Control``), then a msgpack body:
  ``Control.SLOTS`` carries ``Slots`` (the autosize controller moved the handler slots);
  ``Control.RECYCLE`` has no body and comes last: the worker may leave once it finished what it
  has (max_tasks_per_child, max_memory_per_child_bytes).

Worker -> supervisor (the output ring):

- a **completion**: ``COMPLETION`` header (tag >= 1, a ``Status``, the retry delay in seconds),
  then the payload: the reason in UTF-8 for RETRY and DEAD, the reply for RESULT, nothing for OK,
  a ``Returned`` (msgpack) for VALUE and FAILED: what the handler returned or how it failed for
  good, to keep (``fastq.results``) and to publish (``publish_to``).
- a **report**: ``COMPLETION`` header of tag 0 whose status byte is a ``Report``, delay 0;
  ``Report.CLASSIFIED`` carries ``Classified`` (msgpack), ``Report.TALLY`` a list of ``Counts``
  (what the worker counted for /metrics since its last report, written in the same batch as the
  completions it counts), the others nothing.

``WorkerSpec`` is everything a worker is started with; the exit codes say how it left.
"""

from __future__ import annotations

import enum
import struct

import msgspec

from fastq.errors import FastqError
from fastq.ring import COMPLETION, DELIVERY, STATUS_OK

__all__ = [
    "COMPLETION",
    "CONTROL",
    "DELIVERY",
    "EXIT_FAILED",
    "EXIT_RECYCLED",
    "NO_TAG",
    "RETRIES_MASK",
    "WITH_HEADERS",
    "Classified",
    "Control",
    "Counts",
    "Produced",
    "ProtocolError",
    "Report",
    "Returned",
    "Slots",
    "Status",
    "WorkerSpec",
    "classified_report",
    "completion",
    "delivery_queue",
    "encode_returned",
    "is_control",
    "parse_classified",
    "parse_control",
    "parse_returned",
    "parse_slots",
    "parse_tally",
    "ready_report",
    "recycle_frame",
    "retire_report",
    "slots_frame",
    "split_headers",
    "tally_report",
    "with_headers",
]


class Status(enum.IntEnum):
    """What became of a delivery: the status byte of a completion of tag >= 1."""

    #: done: ack it (the one status the dispatcher in the core knows)
    OK = STATUS_OK
    #: failed; deliver it again after the completion's delay (seconds); the payload is why
    RETRY = 1
    #: failed for good; dead-letter it with the payload as the reason
    DEAD = 2
    #: a ``fastq.Pool`` batch is done; the payload is its reply (``fastq.codec``)
    RESULT = 5
    #: done, with a value to keep or outputs to publish first (payload: ``Returned``)
    VALUE = 7
    #: failed for good, with the failure to keep (payload: ``Returned``; ``reason`` set)
    FAILED = 8


class Report(enum.IntEnum):
    """A worker speaking for itself: the status byte of a completion of tag 0."""

    #: the first frame a worker writes: its rings are attached and its executor loaded
    READY = 3
    #: past max_tasks_per_child or max_memory_per_child_bytes: it asks to leave
    RETIRE = 4
    #: it measured the "auto" handlers of a queue (body: ``Classified``)
    CLASSIFIED = 6
    #: what it counted for /metrics since its last report (body: a list of ``Counts``)
    TALLY = 9


class Control(enum.IntEnum):
    """What the supervisor tells a worker: the kind of a control frame (tag 0)."""

    #: new handler slots, in all and per queue (body: ``Slots``)
    SLOTS = 1
    #: the go-ahead to leave, after everything the worker was given already (no body)
    RECYCLE = 2


#: the header of a control frame: tag 0 (never a delivery's), then the ``Control``
CONTROL = struct.Struct("<QH")
#: the first bytes of every frame of tag 0
NO_TAG = bytes(8)
#: where a delivery's queue index sits, as a struct of its own (read without the rest)
_QUEUE = struct.Struct("<H")
_QUEUE_OFFSET = DELIVERY.size - _QUEUE.size
assert DELIVERY.format.endswith("H"), "the queue index is the DELIVERY header's last field"

#: a delivery whose body starts with its broker message's headers (a consumer's queue, when the
#: app has middleware that processes messages): this bit of the DELIVERY header's retries field
WITH_HEADERS = 1 << 31
#: the retries themselves
RETRIES_MASK = WITH_HEADERS - 1
_HEADERS_SIZE = struct.Struct("<I")

#: the exit code of a worker that left on purpose (recycled): EX_TEMPFAIL
EXIT_RECYCLED = 75
#: the exit code of a worker that stopped on a bug of its own (logged); its messages go elsewhere
EXIT_FAILED = 70


class ProtocolError(FastqError, ValueError):
    """A frame that this version of the protocol does not know: the two ends run different
    fastq versions, or something else wrote to the ring."""


class Slots(msgspec.Struct, array_like=True, frozen=True):
    """A worker's handler slots: in all, and of each queue (index = queue index; empty: the
    worker serves one queue, which has them all)."""

    total: int
    per_queue: tuple[int, ...] = ()


class Produced(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """One message a handler produced (``publish_to``), encoded by the worker."""

    queue: str
    message_id: str
    body: bytes
    #: to an exchange instead of a queue (``fastq.Route``): its name and kind, the routing key
    exchange: str = ""
    exchange_kind: str = ""
    routing_key: str = ""
    headers: dict[str, str] | None = None


class Returned(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """What became of a delivery that keeps a result or publishes (VALUE, FAILED)."""

    #: the handler's name
    handler: str
    #: seconds to keep ``outcome`` (0: keep nothing)
    keep: float = 0.0
    #: a ``fastq.results.Outcome``, msgpack (empty when nothing is kept)
    outcome: bytes = b""
    #: the dead letter's reason (FAILED)
    reason: str = ""
    #: the messages to publish before the delivery is acked (VALUE)
    outputs: tuple[Produced, ...] = ()
    #: the waiter to poke once the outcome is stored (``fastq._notify``)
    notify: str = ""


class Classified(msgspec.Struct, array_like=True, frozen=True):
    """What a worker measured of a queue's "auto" handlers."""

    queue: str
    #: "io" or "cpu"
    kind: str
    #: on-CPU time over wall time of the calls measured, 0..1
    share: float


#: the upper bounds (seconds) of the handler-duration histogram's buckets (then +Inf)
HANDLER_BUCKETS = (
    0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0,
)  # fmt: skip
#: the upper bounds (seconds) of the enqueue-to-start histogram's buckets (then +Inf)
LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    1800.0, 3600.0,
)  # fmt: skip


class Counts(msgspec.Struct, array_like=True, gc=False):
    """What a worker counted of one queue's handler since its last report (deltas). A
    histogram's buckets are not cumulative here: one count per bound of its ``*_BUCKETS``, then
    one for +Inf."""

    queue: str
    #: the task's or consumer's name ("" for a body that is not an envelope)
    task: str
    #: handler runs that finished (succeeded or raised)
    processed: int
    #: of those, the ones that raised
    failed: int
    #: failures that will run again
    retried: int
    #: failures for good, and messages that never reached a handler: dead-lettered
    dead: int
    handler_buckets: list[int]
    handler_sum: float
    latency_buckets: list[int]
    latency_sum: float


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a worker needs, sent to it as msgpack (workers never read the environment)."""

    index: int
    #: the supervisor's pid: a worker does not outlive it
    parent: int
    cpu: int | None
    #: ``module:attribute`` of the App (the engine); empty for fastq.Pool
    app: str
    queues: tuple[str, ...]
    input_ring: str
    output_ring: str
    concurrency: int
    #: ``module:factory`` of what runs the frames (fastq.executors); the factory gets the
    #: worker's runtime and returns an executor (fastq.worker.Executor)
    executor: str
    log_level: str = "WARNING"
    #: "text" or "json" (``fastq worker --log-format``, fastq.logs)
    log_format: str = "text"
    #: ask to leave after this many messages; the supervisor lets one worker go at a time
    max_tasks: int | None = None
    #: ask to leave once the resident set grows past this (checked after each batch)
    max_memory_bytes: int | None = None
    #: with several queues: the handler slots of each (index = queue index), so that one
    #: queue's deep backlog here does not keep another's frames from a slot (empty: one lane)
    queue_slots: tuple[int, ...] = ()
    #: threads a worker may use for plain-function I/O handlers (started only when used)
    io_threads: int = 100
    #: the most a return value kept or published may take, encoded (Config.max_message_bytes)
    max_message_bytes: int = 1 << 20
    #: count for /metrics (Report.TALLY): the supervisor serves them
    metrics: bool = False


_encoder = msgspec.msgpack.Encoder()
_slots = msgspec.msgpack.Decoder(Slots)
_classified = msgspec.msgpack.Decoder(Classified)
_returned = msgspec.msgpack.Decoder(Returned)
_tally = msgspec.msgpack.Decoder(list[Counts])
_headers = msgspec.msgpack.Decoder(dict[str, str])


# -- supervisor -> worker -------------------------------------------------------------------------


def slots_frame(total: int, per_queue: tuple[int, ...] = ()) -> bytes:
    """The control frame that gives a worker ``total`` handler slots (``per_queue`` of them by
    queue index, when it serves several queues)."""
    return CONTROL.pack(0, Control.SLOTS) + _encoder.encode(Slots(total, per_queue))


def recycle_frame() -> bytes:
    """The control frame that lets a worker leave once it finished what it was given."""
    return CONTROL.pack(0, Control.RECYCLE)


def is_control(frame: bytes) -> bool:
    return frame.startswith(NO_TAG)


def parse_control(frame: bytes) -> tuple[Control, memoryview]:
    """The kind and body of a control frame.

    Raises:
        ProtocolError: the frame is too short or names no ``Control``.
    """
    if len(frame) < CONTROL.size:
        raise ProtocolError(
            f"a control frame of {len(frame)} bytes, expected at least "
            f"{CONTROL.size}; the supervisor runs another fastq version?"
        )
    _, kind = CONTROL.unpack_from(frame)
    try:
        control = Control(kind)
    except ValueError:
        raise ProtocolError(
            f"control frame of unknown kind {kind}; the supervisor runs another fastq version?"
        ) from None
    return control, memoryview(frame)[CONTROL.size :]


def parse_slots(body: bytes | memoryview) -> Slots:
    try:
        return _slots.decode(body)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"a slots frame whose body does not decode ({e})") from e


def with_headers(headers: dict[str, str], body: bytes) -> bytes:
    """A delivery's body with its broker message's headers in front (set WITH_HEADERS)."""
    encoded = _encoder.encode(headers)
    return _HEADERS_SIZE.pack(len(encoded)) + encoded + body


def split_headers(body: memoryview) -> tuple[dict[str, str], memoryview]:
    """The headers and the body of a delivery sent ``with_headers``.

    Raises:
        ProtocolError: the headers do not decode.
    """
    (size,) = _HEADERS_SIZE.unpack_from(body)
    end = _HEADERS_SIZE.size + size
    try:
        headers = _headers.decode(body[_HEADERS_SIZE.size : end])
    except (msgspec.DecodeError, struct.error) as e:
        raise ProtocolError(f"a delivery's headers that do not decode ({e})") from e
    return headers, body[end:]


def delivery_queue(frame: bytes) -> int:
    """The queue index of a delivery frame."""
    return int(_QUEUE.unpack_from(frame, _QUEUE_OFFSET)[0])


# -- worker -> supervisor -------------------------------------------------------------------------


def completion(tag: int, status: Status, delay: float = 0.0, payload: bytes = b"") -> bytes:
    """A completion frame: what became of delivery ``tag``."""
    return COMPLETION.pack(tag, status, delay) + payload


def ready_report() -> bytes:
    return COMPLETION.pack(0, Report.READY, 0.0)


def retire_report() -> bytes:
    return COMPLETION.pack(0, Report.RETIRE, 0.0)


def classified_report(queue: str, kind: str, share: float) -> bytes:
    return COMPLETION.pack(0, Report.CLASSIFIED, 0.0) + _encoder.encode(
        Classified(queue, kind, share)
    )


def parse_classified(payload: bytes) -> Classified:
    """Raises ProtocolError when the payload is not a ``Classified``."""
    try:
        return _classified.decode(payload)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"a measurement that does not decode ({e})") from e


def encode_returned(returned: Returned) -> bytes:
    """The payload of a VALUE or FAILED completion."""
    return _encoder.encode(returned)


def parse_returned(payload: bytes) -> Returned:
    """Raises ProtocolError when the payload is not a ``Returned``."""
    try:
        return _returned.decode(payload)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"a returned value that does not decode ({e})") from e


def tally_report(counts: list[Counts]) -> bytes:
    return COMPLETION.pack(0, Report.TALLY, 0.0) + _encoder.encode(counts)


def parse_tally(payload: bytes) -> list[Counts]:
    """Raises ProtocolError when the payload is not a list of ``Counts``."""
    try:
        return _tally.decode(payload)
    except msgspec.DecodeError as e:
        raise ProtocolError(f"a tally that does not decode ({e})") from e
