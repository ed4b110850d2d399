"""The shared-memory contract of fastq._core and its twin: values only.

The ring header's slots, the frame formats, the value types both implementations return, the
checks of their arguments and the texts of their errors. ``_core.pyx`` and ``_core_py.py`` both
import this module, so that none of it is written twice and neither imports the other;
tests/unit/test_ring_layout.py checks that a ring written by one implementation reads back
through the other.
"""

from __future__ import annotations

import operator
import re
import struct
import time
from typing import NamedTuple

from fastq.errors import ConfigError, FrameTooLarge, RingCorrupt, RingFull

# -- the ring ---------------------------------------------------------------------------------

#: Bytes before the data area: 32 little-endian u64 slots, grouped in 64-byte lines by writer.
HEADER_BYTES = 256
#: First slot of every ring; the last byte is the layout version.
MAGIC = int.from_bytes(b"fastqRg1", "little")

# Slot numbers (index of a u64 in the header); RingHeader in _core.pxd has the same order.
SLOT_MAGIC, SLOT_CAPACITY, SLOT_CLOSED = 0, 1, 2
# Line 1 (bytes 64-127): written by the producer.
SLOT_HEAD, SLOT_FRAMES_PUT, SLOT_PUTS_BLOCKED, SLOT_PEAK_USED = 8, 9, 10, 11
SLOT_PRODUCER_PID, SLOT_PRODUCER_WAITING = 12, 13
# Line 2 (bytes 128-191): written by the consumer.
SLOT_TAIL, SLOT_FRAMES_GOT, SLOT_GETS_BLOCKED = 16, 17, 18
SLOT_CONSUMER_PID, SLOT_CONSUMER_WAITING = 19, 20

#: Each frame is a u32 length, the payload, and padding to FRAME_ALIGN.
FRAME_HEADER = struct.Struct("<I")
FRAME_ALIGN = 8
MIN_SIZE_BYTES = 64
#: Frame lengths are u32, so the data area stays below 4 GiB.
MAX_SIZE_BYTES = 1 << 32
#: A wait with no news wakes this often to check that the peer process still lives.
WAIT_SLICE_SECONDS = 0.25
#: Default for Ring.spin_seconds: how long a blocking wait spins before it sleeps.
SPIN_SECONDS = 50e-6
#: get_many returns at most this many frames per call, whatever max_frames says.
GET_MANY_LIMIT = 65536

PRODUCER, CONSUMER = "producer", "consumer"

#: A wake-up address is 9 bytes plus the name and must fit sockaddr_un's 108.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,90}")


class RingStatistics(NamedTuple):
    """A snapshot of one ring; counters are totals since the ring was created."""

    used_bytes: int
    capacity_bytes: int
    frames: int
    peak_used_bytes: int
    puts_blocked: int
    gets_blocked: int
    frames_put: int
    frames_got: int
    producer_pid: int
    consumer_pid: int
    closed: bool


def record_bytes(size: int) -> int:
    """Bytes one frame of ``size`` payload bytes takes in the ring."""
    return (FRAME_HEADER.size + size + FRAME_ALIGN - 1) & ~(FRAME_ALIGN - 1)


def check_size(size_bytes: int) -> int:
    """Validate a requested ring size; returns the data capacity (rounded up to FRAME_ALIGN)."""
    if not isinstance(size_bytes, int) or isinstance(size_bytes, bool):
        raise ConfigError(f"size_bytes must be an int, got {type(size_bytes).__name__}")
    if not MIN_SIZE_BYTES <= size_bytes <= MAX_SIZE_BYTES:
        raise ConfigError(
            f"size_bytes={size_bytes} is outside {MIN_SIZE_BYTES}..{MAX_SIZE_BYTES}; "
            "pick a ring size in that range"
        )
    return (size_bytes + FRAME_ALIGN - 1) & ~(FRAME_ALIGN - 1)  # MAX_SIZE_BYTES is a multiple of 8


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(
            f"ring name {name!r} is not 1-90 characters of letters, digits, '_', '.' or '-'; "
            "pass such a name or None for a generated one"
        )
    return name


def wakeup_address(name: str, role: str) -> bytes:
    """Abstract unix-socket address (Linux) where the ``role`` end of ring ``name`` takes
    wake-ups.

    Nothing is created on disk, and the kernel frees the address when the process dies: that is
    how the other end learns, without any pid check, that its peer is gone.
    """
    return b"\0fastq/" + name.encode() + b"/" + role[0].encode()


def check_timeout(timeout: float | None) -> float | None:
    """Turn a timeout in seconds into a monotonic deadline (None: wait as long as it takes)."""
    if timeout is None:
        return None
    if not timeout >= 0:  # also rejects NaN
        raise ConfigError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
    return time.monotonic() + timeout


def check_max_frames(max_frames: int) -> int:
    """Validate max_frames; returns how many frames one call may return."""
    max_frames = operator.index(max_frames)
    if max_frames < 1:
        raise ConfigError(f"max_frames must be >= 1, got {max_frames}")
    return min(max_frames, GET_MANY_LIMIT)


def check_header(name: str, magic: int, capacity: int, segment_bytes: int) -> None:
    if magic != MAGIC:
        raise RingCorrupt(
            f"segment {name!r} starts with {magic:#x}, expected the fastq ring magic {MAGIC:#x}; "
            "it is not a ring of this fastq version"
        )
    if capacity + HEADER_BYTES != segment_bytes:
        raise RingCorrupt(
            f"ring {name!r} claims {capacity} data bytes but its segment has {segment_bytes}"
        )


def too_small(name: str, size: int) -> RingCorrupt:
    return RingCorrupt(f"segment {name!r} has {size} bytes: it is not a fastq ring")


def too_large(name: str, index: int, size: int, capacity: int) -> FrameTooLarge:
    return FrameTooLarge(
        f"frame {index} of {size} bytes exceeds max_frame_bytes={capacity - FRAME_HEADER.size} "
        f"of ring {name!r} (size_bytes={capacity}); create the ring with a larger size_bytes "
        "or split the payload"
    )


def full(name: str, written: int, total: int, timeout: bool) -> RingFull:
    why = "the wait timed out" if timeout else "put_many_nowait does not wait"
    return RingFull(
        f"ring {name!r} is full: {written} of {total} frames written and {why}; "
        f"resend frames[{written}:] once the consumer catches up",
        written,
    )


def frame_view(index: int, frame: object) -> memoryview:
    """A flat byte view of one frame given to put_many, or a TypeError that says what to pass."""
    try:
        view = memoryview(frame)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"frame {index} is {type(frame).__name__}, expected bytes or another "
            "bytes-like object; encode it first"
        ) from None
    if not view.contiguous:
        raise TypeError(f"frame {index} is a non-contiguous buffer; pass a contiguous copy")
    return view.cast("B") if view.ndim != 1 or view.format != "B" else view


# -- the frames the dispatcher writes and reads -------------------------------------------------

#: supervisor -> worker frame header: delivery tag, attempt (retries so far), queue index; the
#: body follows. Tag 0 is never a delivery: such frames are control frames (fastq.wire).
DELIVERY = struct.Struct("<QIH")
#: worker -> supervisor frame header: delivery tag, status, retry delay (s); a payload follows.
#: Tag 0: the worker speaking for itself (fastq.wire.Report).
COMPLETION = struct.Struct("<QBd")
#: the one status the dispatcher knows: a delivery that is done and can be acked
STATUS_OK = 0


class DispatcherStatistics(NamedTuple):
    """Totals since the dispatcher was made, and what each worker holds now."""

    dispatched: int
    completed: int
    #: completions of tags the worker no longer held (handed on after a detach): dropped
    stale: int
    in_flight: tuple[int, ...]


def check_worker(worker: int, workers: int) -> int:
    worker = operator.index(worker)
    if not 0 <= worker < workers:
        raise IndexError(
            f"worker {worker} is outside 0..{workers - 1}; this dispatcher has {workers} workers"
        )
    return worker


def check_queue(queue: int, queues: int) -> int:
    queue = operator.index(queue)
    if not 0 <= queue < queues:
        raise IndexError(
            f"queue index {queue} is outside 0..{queues - 1}; this dispatcher has {queues} queues"
        )
    return queue


def check_counts(workers: int, queues: int) -> None:
    if not 1 <= operator.index(workers) <= 65535:
        raise ConfigError(f"workers must be 1..65535, got {workers}")
    if not 1 <= operator.index(queues) <= 65535:
        raise ConfigError(f"queues must be 1..65535 (a u16 in the frame), got {queues}")


def bad_item(item: object) -> TypeError:
    return TypeError(f"a delivery is (tag, retries, queue index, body), got {item!r:.80}")


def delivery_too_large(name: str, tag: int, size: int, capacity: int) -> FrameTooLarge:
    return FrameTooLarge(
        f"delivery {tag} of {size} bytes (header included) exceeds max_frame_bytes="
        f"{capacity - FRAME_HEADER.size} of ring {name!r}; raise ring_size_bytes or lower "
        "max_message_bytes in the Config"
    )


def already_attached(worker: int) -> ConfigError:
    return ConfigError(f"worker {worker} already has a ring; detach() it before attaching another")


def short_completion(worker: int, size: int) -> RingCorrupt:
    return RingCorrupt(
        f"worker {worker} wrote a completion of {size} bytes, expected at least "
        f"{COMPLETION.size} (tag, status, delay); its ring was written by something that is not "
        "a fastq worker"
    )


def tag_below_window(tag: int, first: int) -> ValueError:
    return ValueError(
        f"tag {tag} is below the window, which starts at {first}: it was acked already"
    )
