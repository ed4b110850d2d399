"""Reference implementation of fastq._core: slow and obvious on purpose.

Any behavioural difference from this module is a bug in _core.pyx. What both implementations
share (the layout, the value types, the error texts) is in fastq/_layout.py, and the segment's and
wake-up sockets' life cycle in fastq/_segment.py; this module is the twin and nothing else.
tests/unit/test_ring_layout.py checks that a ring written by one implementation reads back through
the other.

Memory ordering: this twin relies on aligned 8-byte memoryview loads and stores being single
instructions and on the strong ordering of x86-64. It is the reference for behaviour and layout,
not a transport for weakly ordered CPUs; _core.pyx uses C11 acquire/release atomics. A wake-up it
misses (it has no store-load fence) costs at most WAIT_SLICE_SECONDS, never a hang.
"""

from __future__ import annotations

import contextlib
import mmap
import operator
import os
import select
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Self

from fastq._layout import (
    COMPLETION,
    CONSUMER,
    DELIVERY,
    FRAME_HEADER,
    HEADER_BYTES,
    MAGIC,
    PRODUCER,
    SLOT_CAPACITY,
    SLOT_CLOSED,
    SLOT_CONSUMER_PID,
    SLOT_CONSUMER_WAITING,
    SLOT_FRAMES_GOT,
    SLOT_FRAMES_PUT,
    SLOT_GETS_BLOCKED,
    SLOT_HEAD,
    SLOT_MAGIC,
    SLOT_PEAK_USED,
    SLOT_PRODUCER_PID,
    SLOT_PRODUCER_WAITING,
    SLOT_PUTS_BLOCKED,
    SLOT_TAIL,
    SPIN_SECONDS,
    STATUS_OK,
    WAIT_SLICE_SECONDS,
    DispatcherStatistics,
    RingStatistics,
    already_attached,
    bad_item,
    check_counts,
    check_header,
    check_max_frames,
    check_name,
    check_queue,
    check_size,
    check_timeout,
    check_worker,
    delivery_too_large,
    frame_view,
    full,
    record_bytes,
    short_completion,
    tag_below_window,
    too_large,
    wakeup_address,
)
from fastq._segment import (
    bind_wakeup,
    new_name,
    open_segment,
    probe,
    register_creator,
    send_wakeup,
    unlink_segment,
)

if TYPE_CHECKING:
    from typing_extensions import Buffer

from fastq.errors import PeerLost, RingBusy, RingClosed, RingCorrupt, RingEmpty, RingFull

__all__ = [
    "AckWindow",
    "Dispatcher",
    "DispatcherStatistics",
    "Ring",
    "RingStatistics",
    "plain_values",
]


class Ring:
    """A single-producer single-consumer ring of byte frames in shared memory.

    One process puts, one process gets; either may have created the ring. Frames are any
    bytes-like objects; ``get_many`` returns them as ``bytes`` in put order.
    """

    spin_seconds: float
    _name: str
    _capacity: int
    _finalizer: Any  # multiprocessing.util.Finalize while this handle created the ring, else None

    def __init__(self) -> None:
        raise TypeError("use Ring.create(size_bytes) or Ring.attach(name)")

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def create(cls, size_bytes: int, *, name: str | None = None) -> Ring:
        """Create a ring with ``size_bytes`` of frame space.

        Parameters:
            size_bytes: data bytes (64 B to 4 GiB, rounded up to 8); a frame of n bytes takes
                n + 4 rounded up to 8.
            name: the shared-memory name other processes attach by; generated when None.

        Raises:
            ConfigError: the size or name is invalid, or a ring of that name exists.
        """
        capacity = check_size(size_bytes)
        name = new_name() if name is None else check_name(name)
        self = cls.__new__(cls)
        self._setup(name, open_segment(name, HEADER_BYTES + capacity))
        self._finalizer = register_creator(name)
        h = self._h
        h[SLOT_CAPACITY] = capacity
        h[SLOT_MAGIC] = MAGIC  # last: an attacher that sees the magic sees the rest
        self._capacity = capacity
        return self

    @classmethod
    def attach(cls, name: str) -> Ring:
        """Open the ring another process created.

        Raises:
            RingNotFound: no ring has that name.
            RingCorrupt: the segment is not a ring of this fastq version.
        """
        check_name(name)
        segment = open_segment(name, None)
        self = cls.__new__(cls)
        self._setup(name, segment)
        self._finalizer = None
        try:
            check_header(name, self._h[SLOT_MAGIC], self._h[SLOT_CAPACITY], len(segment))
        except BaseException:
            self._release()
            raise
        self._capacity = int(self._h[SLOT_CAPACITY])
        return self

    def _setup(self, name: str, segment: mmap.mmap) -> None:
        self._name = name
        self._mmap = segment
        view = memoryview(segment)
        self._h = view[:HEADER_BYTES].cast("Q")
        self._data = view[HEADER_BYTES:]
        self._view = view
        self._sockets: dict[str, socket.socket] = {}
        self._open = True
        self._closing = False  # close() was called while a call on this handle ran
        self._calls: set[str] = set()  # the ends (producer, consumer) with a call running
        self.spin_seconds = SPIN_SECONDS

    def _release(self) -> None:
        for s in self._sockets.values():
            s.close()
        self._sockets.clear()
        self._h.release()
        self._data.release()
        self._view.release()
        self._mmap.close()
        self._open = False

    def __del__(self) -> None:
        # Dropped without close(): the sockets go (the peer sees this end as gone), the ring
        # stays open for the other end.
        for s in getattr(self, "_sockets", {}).values():
            s.close()

    def close(self) -> None:
        """Close the ring for both ends, wake the peer, and unmap it from this process.

        The consumer still gets the frames already put, then ``RingClosed``; puts raise
        ``RingClosed``. A call still running on this handle (another thread, or the code around a
        signal handler that closes) ends with ``RingClosed``; the unmap waits for it.
        Idempotent. The name stays until ``unlink()``.
        """
        if not self._open or self._closing:
            return
        self._closing = True
        self._h[SLOT_CLOSED] = 1
        for role in (PRODUCER, CONSUMER):
            self._wake(role)
        if not self._calls:
            self._release()

    def unlink(self) -> None:
        """Remove the ring's name so that nothing is left in /dev/shm (the creator's job).

        Processes that have it open keep their mapping. Idempotent.
        """
        unlink_segment(self._name, self._finalizer is not None)
        if self._finalizer is not None:
            self._finalizer.cancel()
            self._finalizer = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        """Close; the creator also unlinks."""
        self.close()
        if self._finalizer is not None:
            self.unlink()

    # -- properties -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def max_frame_bytes(self) -> int:
        return self._capacity - FRAME_HEADER.size

    @property
    def closed(self) -> bool:
        """True when this handle or the other end closed the ring."""
        return not self._open or self._closing or bool(self._h[SLOT_CLOSED])

    # -- producer ---------------------------------------------------------------------------

    def put_many(self, frames: Iterable[object], *, timeout: float | None = None) -> int:
        """Put all ``frames`` in order, waiting for room as long as ``timeout`` allows.

        Frames are written as a prefix: when the call raises ``RingFull``, frames
        ``[0:exc.written]`` are in the ring and the rest are not. Returns ``len(frames)``.

        Raises:
            FrameTooLarge: some frame can never fit; nothing was written.
            RingFull: the timeout passed first (``exc.written`` tells how far it got).
            RingClosed: the ring is closed; ``PeerLost`` when the consumer died while we waited.
            RingBusy: another process is this ring's producer.
        """
        return self._put(frames, check_timeout(timeout), wait=True)

    def put_many_nowait(self, frames: Iterable[object]) -> int:
        """Put the longest prefix of ``frames`` that fits now; ``RingFull`` if that is not all."""
        return self._put(frames, None, wait=False)

    def put(self, frame: object, *, timeout: float | None = None) -> None:
        self.put_many((frame,), timeout=timeout)

    def put_nowait(self, frame: object) -> None:
        self.put_many_nowait((frame,))

    def _put(self, frames: Iterable[object], deadline: float | None, *, wait: bool) -> int:
        self._check_open()
        frames = tuple(frames)  # a private, immutable sequence
        with self._call(PRODUCER):
            return self._put_frames(frames, deadline, wait=wait)

    def _put_frames(self, frames: tuple[object, ...], deadline: float | None, *, wait: bool) -> int:
        views = [frame_view(i, f) for i, f in enumerate(frames)]
        for i, v in enumerate(views):
            if record_bytes(v.nbytes) > self._capacity:
                raise too_large(self._name, i, v.nbytes, self._capacity)
        if not views:
            return 0
        self._take_role(PRODUCER)
        written, blocked = 0, False
        while True:
            if self._h[SLOT_CLOSED]:
                raise RingClosed(f"ring {self._name!r} is closed; no more frames can be put")
            written = self._write(views, written)
            if written == len(views):
                return written
            if not wait:
                raise full(self._name, written, len(views), timeout=False)
            if not blocked:
                self._h[SLOT_PUTS_BLOCKED] += 1
                blocked = True
            need = record_bytes(views[written].nbytes)

            def room(need: int = need) -> bool:
                return self._free() >= need

            if not self._wait(PRODUCER, deadline, room):
                raise full(self._name, written, len(views), timeout=True)

    def _free(self) -> int:
        return self._capacity - (self._h[SLOT_HEAD] - self._h[SLOT_TAIL])

    def _write(self, views: list[memoryview], start: int) -> int:
        h, data, cap = self._h, self._data, self._capacity
        head, tail = h[SLOT_HEAD], h[SLOT_TAIL]
        free, pos = cap - (head - tail), head % cap
        i = start
        while i < len(views):
            size = views[i].nbytes
            rec = record_bytes(size)
            if rec > free:
                break
            FRAME_HEADER.pack_into(data, pos, size)
            p = pos + FRAME_HEADER.size  # < cap: pos and cap are multiples of 8
            first = min(size, cap - p)
            data[p : p + first] = views[i][:first]
            data[: size - first] = views[i][first:]
            pos, head, free, i = (pos + rec) % cap, head + rec, free - rec, i + 1
        if i > start:
            h[SLOT_FRAMES_PUT] += i - start  # counted first: frames_got never passes frames_put
            h[SLOT_HEAD] = head  # publish: the payload above is written before the head moves
            h[SLOT_PEAK_USED] = max(h[SLOT_PEAK_USED], cap - free)
            self._wake(CONSUMER)
        return i

    # -- consumer ---------------------------------------------------------------------------

    def get_many(self, max_frames: int = 1024, *, timeout: float | None = None) -> list[bytes]:
        """Return 1 to ``max_frames`` frames in put order, waiting for the first one.

        Raises:
            RingEmpty: ``timeout`` passed with no frame.
            RingClosed: the ring is closed and drained; ``PeerLost`` when the producer died while
                we waited.
            RingBusy: another process is this ring's consumer.
        """
        limit = check_max_frames(max_frames)
        deadline = check_timeout(timeout)
        with self._call(CONSUMER):
            self._take_role(CONSUMER)
            blocked = False
            while True:
                frames = self._read(limit)
                if frames:
                    return frames
                if self._h[SLOT_CLOSED]:
                    raise RingClosed(f"ring {self._name!r} is closed and drained")
                if not blocked:
                    self._h[SLOT_GETS_BLOCKED] += 1
                    blocked = True
                if not self._wait(CONSUMER, deadline, self._readable):
                    raise RingEmpty(f"ring {self._name!r} stayed empty until the timeout")

    def get_many_nowait(self, max_frames: int = 1024) -> list[bytes]:
        """Return the frames there are now (at most ``max_frames``); ``RingEmpty`` if none."""
        limit = check_max_frames(max_frames)
        with self._call(CONSUMER):
            self._take_role(CONSUMER)
            frames = self._read(limit)
            if frames:
                return frames
            if self._h[SLOT_CLOSED]:
                raise RingClosed(f"ring {self._name!r} is closed and drained")
            raise RingEmpty(f"ring {self._name!r} is empty")

    def get(self, *, timeout: float | None = None) -> bytes:
        return self.get_many(1, timeout=timeout)[0]

    def get_nowait(self) -> bytes:
        return self.get_many_nowait(1)[0]

    def _readable(self) -> bool:
        return self._h[SLOT_HEAD] != self._h[SLOT_TAIL] or bool(self._h[SLOT_CLOSED])

    def _read(self, limit: int) -> list[bytes]:
        """Up to ``limit`` frames (empty when there are none).

        Frames before a corrupt length are returned (and consumed); the error comes with the
        next call, when the corrupt frame is the first one.
        """
        h, data, cap = self._h, self._data, self._capacity
        tail, head = h[SLOT_TAIL], h[SLOT_HEAD]
        pos, out = tail % cap, list[bytes]()
        while tail != head and len(out) < limit:
            (size,) = FRAME_HEADER.unpack_from(data, pos)
            rec = record_bytes(size)
            if rec > head - tail:
                if out:
                    break
                raise RingCorrupt(
                    f"ring {self._name!r} holds a frame of {size} bytes at offset {pos} but only "
                    f"{head - tail} bytes are unread: another writer broke the ring"
                )
            p = pos + FRAME_HEADER.size
            first = min(size, cap - p)
            out.append(bytes(data[p : p + first]) + bytes(data[: size - first]))
            pos, tail = (pos + rec) % cap, tail + rec
        if out:
            h[SLOT_TAIL] = tail
            h[SLOT_FRAMES_GOT] += len(out)
            self._wake(PRODUCER)
        return out

    # -- waiting ----------------------------------------------------------------------------

    def fileno(self) -> int:
        """The consumer's wake-up descriptor, for ``loop.add_reader``; see ``request_wakeup``."""
        self._check_open()
        return self._take_role(CONSUMER).fileno()

    def request_wakeup(self) -> bool:
        """Ask the producer to make ``fileno()`` readable at its next put.

        Returns False, and asks nothing, when a frame (or the close) is already there: get it
        instead of sleeping. After the descriptor fires, call ``clear_wakeup()``.
        """
        self._check_open()
        self._take_role(CONSUMER)
        self._h[SLOT_CONSUMER_WAITING] = 1
        if self._readable():
            self._h[SLOT_CONSUMER_WAITING] = 0
            return False
        self._h[SLOT_GETS_BLOCKED] += 1
        return True

    def clear_wakeup(self) -> None:
        """Withdraw a pending ``request_wakeup`` and take the wake-up it produced, if any.

        A request produces at most one wake-up, so one read suffices (one syscall, not two); a
        stray extra one only makes ``fileno()`` readable once more.
        """
        self._check_open()
        sock = self._take_role(CONSUMER)
        self._h[SLOT_CONSUMER_WAITING] = 0
        try:
            sock.recv(64)
        except BlockingIOError:
            pass

    def producer_alive(self) -> bool:
        """True while a producer process holds this ring (its wake-up address is bound)."""
        return self._alive(PRODUCER)

    def consumer_alive(self) -> bool:
        """True while a consumer process holds this ring (its wake-up address is bound)."""
        return self._alive(CONSUMER)

    def _alive(self, role: str) -> bool:
        if role in self._sockets:
            return True
        return probe(wakeup_address(self._name, role))

    def _wait(self, role: str, deadline: float | None, ready: Callable[[], bool]) -> bool:
        """Sleep until ``ready()`` or the deadline; False on timeout. Raises PeerLost."""
        sock = self._sockets[role]
        slot = SLOT_PRODUCER_WAITING if role == PRODUCER else SLOT_CONSUMER_WAITING
        peer = CONSUMER if role == PRODUCER else PRODUCER
        peer_pid = SLOT_CONSUMER_PID if role == PRODUCER else SLOT_PRODUCER_PID
        while True:
            self._h[slot] = 1
            if ready():
                self._h[slot] = 0
                return True
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self._h[slot] = 0
                return False
            wait = (
                WAIT_SLICE_SECONDS if deadline is None else min(WAIT_SLICE_SECONDS, deadline - now)
            )
            woken = bool(select.select([sock], [], [], wait)[0])
            self._h[slot] = 0
            self._drain(sock)
            if ready():
                return True
            if self._h[SLOT_CLOSED] or self._closing:
                return True  # the caller raises RingClosed
            if not woken and self._h[peer_pid] and not self._alive(peer):
                raise PeerLost(
                    f"the {peer} of ring {self._name!r} (pid {self._h[peer_pid]}) is gone"
                )

    @staticmethod
    def _drain(sock: socket.socket) -> None:
        try:
            while sock.recv(64):
                pass
        except BlockingIOError:
            pass

    def _wake(self, role: str) -> None:
        slot = SLOT_PRODUCER_WAITING if role == PRODUCER else SLOT_CONSUMER_WAITING
        if self._h[slot]:
            self._h[slot] = 0
            send_wakeup(wakeup_address(self._name, role))

    def _take_role(self, role: str) -> socket.socket:
        sock = self._sockets.get(role)
        if sock is None:
            slot = SLOT_PRODUCER_PID if role == PRODUCER else SLOT_CONSUMER_PID
            sock = self._sockets[role] = bind_wakeup(self._name, role, self._h[slot])
            self._h[slot] = os.getpid()
        return sock

    # -- introspection ----------------------------------------------------------------------

    def statistics(self) -> RingStatistics:
        self._check_open()
        h = self._h
        # The consumer's counters first: head and frames_put only grow, so nothing goes negative.
        tail, got = h[SLOT_TAIL], h[SLOT_FRAMES_GOT]
        return RingStatistics(
            used_bytes=h[SLOT_HEAD] - tail,
            capacity_bytes=self._capacity,
            frames=h[SLOT_FRAMES_PUT] - got,
            peak_used_bytes=h[SLOT_PEAK_USED],
            puts_blocked=h[SLOT_PUTS_BLOCKED],
            gets_blocked=h[SLOT_GETS_BLOCKED],
            frames_put=h[SLOT_FRAMES_PUT],
            frames_got=got,
            producer_pid=h[SLOT_PRODUCER_PID],
            consumer_pid=h[SLOT_CONSUMER_PID],
            closed=bool(h[SLOT_CLOSED]),
        )

    def _check_open(self) -> None:
        if not self._open or self._closing:
            raise RingClosed(f"this handle of ring {self._name!r} was closed")

    @contextlib.contextmanager
    def _call(self, role: str) -> Iterator[None]:
        """One put (get) call: one thread at a time per end, and close() waits for it."""
        self._check_open()
        if role in self._calls:
            raise RingBusy(
                f"another thread is already the {role} on this handle of ring {self._name!r}; "
                "use one thread per end of a ring"
            )
        self._calls.add(role)
        try:
            yield
        finally:
            self._calls.discard(role)
            if self._closing and not self._calls:
                self._release()  # close() came while this call ran

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Ring {self._name!r} {state} capacity_bytes={self._capacity}>"


# -- the dispatcher -------------------------------------------------------------------------------


class Dispatcher:
    """Routes deliveries into per-worker rings and keeps each worker's in-flight tags.

    ``dispatch`` gives each item ``(tag, retries, queue, body)`` to the accepting worker, among
    those allowed to take its queue, with the fewest in flight, and writes it to that worker's
    ring as one frame ``DELIVERY header + body``. ``complete`` reads a worker's completion frames
    and says which tags are done. Which workers accept work is the caller's decision; this class
    moves bytes and counts.
    """

    def __init__(self, workers: int, queues: int = 1) -> None:
        check_counts(workers, queues)
        self._n, self._queues = workers, queues
        self._rings: list[Ring | None] = [None] * workers
        self._tags: list[set[int]] = [set() for _ in range(workers)]
        self._accepting = [False] * workers
        self._allowed = [[True] * workers for _ in range(queues)]
        #: where the search for the least busy worker starts: ties go round
        self._rotor = 0
        self._dispatched = self._completed = self._stale = 0

    def attach(self, worker: int, ring: Ring) -> None:
        """Give ``worker`` its input ring; it accepts work from now on."""
        worker = check_worker(worker, self._n)
        if self._rings[worker] is not None:
            raise already_attached(worker)
        self._rings[worker] = ring
        self._accepting[worker] = True

    def detach(self, worker: int) -> list[int]:
        """Forget ``worker``'s ring; return the tags it held (ascending), which it holds no more."""
        worker = check_worker(worker, self._n)
        tags = sorted(self._tags[worker])
        self._tags[worker] = set()
        self._rings[worker] = None
        self._accepting[worker] = False
        return tags

    def set_accepting(self, worker: int, accepting: bool) -> None:
        """Whether ``dispatch`` may choose ``worker`` (``dispatch_to`` always may); a worker with
        no ring accepts nothing."""
        worker = check_worker(worker, self._n)
        self._accepting[worker] = bool(accepting) and self._rings[worker] is not None

    def allow(self, queue: int, workers: Iterable[int]) -> None:
        """Only ``workers`` take deliveries of ``queue`` (all do, until this is called)."""
        queue = check_queue(queue, self._queues)
        allowed = {check_worker(w, self._n) for w in workers}
        self._allowed[queue] = [w in allowed for w in range(self._n)]

    def in_flight(self, worker: int) -> int:
        return len(self._tags[check_worker(worker, self._n)])

    def holds(self, worker: int, tag: int) -> bool:
        return tag in self._tags[check_worker(worker, self._n)]

    def dispatch(
        self, items: Iterable[tuple[int, int, int, Buffer]]
    ) -> list[tuple[int, int, int, Buffer]]:
        """Write each item to the least busy accepting worker allowed its queue (among equals,
        the first after the worker chosen last: ties go round); return the items that found no
        such worker, or no room in its ring, in their order."""
        items = list(items)
        load = [len(t) for t in self._tags]
        full = [False] * self._n
        picks: list[int] = []
        for item in items:
            if len(item) != 4:
                raise bad_item(item)
            queue = check_queue(item[2], self._queues)
            allowed = self._allowed[queue]
            best = -1
            for k in range(self._n):
                w = (self._rotor + k) % self._n
                if (
                    self._accepting[w]
                    and allowed[w]
                    and not full[w]
                    and (best < 0 or load[w] < load[best])
                ):
                    best = w
            if best >= 0:
                self._check_size(best, item)
                load[best] += 1
                self._rotor = (best + 1) % self._n
            picks.append(best)
        return self._write(items, picks)

    def dispatch_to(
        self, worker: int, items: Iterable[tuple[int, int, int, Buffer]]
    ) -> list[tuple[int, int, int, Buffer]]:
        """Write ``items`` to ``worker`` whether or not it accepts work; return what did not fit."""
        worker = check_worker(worker, self._n)
        items = list(items)
        for item in items:
            if len(item) != 4:
                raise bad_item(item)
            check_queue(item[2], self._queues)
        if self._rings[worker] is None:
            return items
        for item in items:
            self._check_size(worker, item)
        return self._write(items, [worker] * len(items))

    def _check_size(self, worker: int, item: tuple[int, int, int, Buffer]) -> None:
        ring = self._rings[worker]
        assert ring is not None
        size = DELIVERY.size + memoryview(item[3]).nbytes
        if record_bytes(size) > ring.capacity_bytes:
            raise delivery_too_large(ring.name, item[0], size, ring.capacity_bytes)

    def _write(
        self, items: list[tuple[int, int, int, Buffer]], picks: list[int]
    ) -> list[tuple[int, int, int, Buffer]]:
        for w in range(self._n):
            mine = [i for i, p in enumerate(picks) if p == w]
            if not mine:
                continue
            ring = self._rings[w]
            assert ring is not None
            frames = [
                DELIVERY.pack(items[i][0], items[i][1], items[i][2]) + bytes(items[i][3])
                for i in mine
            ]
            try:
                written = ring.put_many_nowait(frames)
            except RingFull as e:
                written = e.written
            except RingClosed:
                written = 0
            for i in mine[:written]:
                self._tags[w].add(items[i][0])
            for i in mine[written:]:
                picks[i] = -1
            self._dispatched += written
        return [item for item, p in zip(items, picks) if p < 0]

    def complete(
        self, worker: int, frames: Iterable[object]
    ) -> tuple[list[int], list[tuple[int, int, float, bytes]]]:
        """Read ``worker``'s completion frames: the tags done OK, and every other frame as
        ``(tag, status, delay, reason)``. Frames of tag 0 (the worker speaking for itself) are in
        the second list; a tag the worker no longer holds is dropped and counted as stale."""
        worker = check_worker(worker, self._n)
        tags = self._tags[worker]
        ok: list[int] = []
        other: list[tuple[int, int, float, bytes]] = []
        for frame in frames:
            view = memoryview(frame)  # type: ignore[arg-type]
            if view.nbytes < COMPLETION.size:
                raise short_completion(worker, view.nbytes)
            tag, status, delay = COMPLETION.unpack_from(view)
            if tag:
                if tag not in tags:
                    self._stale += 1
                    continue
                tags.discard(tag)
                self._completed += 1
                if status == STATUS_OK:
                    ok.append(tag)
                    continue
            other.append((tag, status, delay, bytes(view[COMPLETION.size :])))
        return ok, other

    def statistics(self) -> DispatcherStatistics:
        return DispatcherStatistics(
            self._dispatched, self._completed, self._stale, tuple(len(t) for t in self._tags)
        )


# -- the ack window -------------------------------------------------------------------------------

_DONE, _ACKED = 1, 2


class AckWindow:
    """The completed tags of a sequence (a channel's delivery tags: first, first+1, ...) and
    the acks they allow.

    ``ack_prefix`` gives the highest tag T such that every tag up to T is complete, for one
    cumulative ack (AMQP ``basic.ack`` with ``multiple``); ``take_stragglers`` hands out
    the completed tags past a gap, to ack one by one, and remembers them so the prefix that later
    covers them never ends on a tag that was acked already.
    """

    def __init__(self, first: int = 1) -> None:
        first = operator.index(first)
        if first < 1:
            raise ValueError(f"first must be >= 1, got {first}")
        self._first = first  # the lowest tag not covered by an ack yet
        self._state: list[int] = []  # per tag from _first: _DONE, _ACKED bits

    @property
    def first(self) -> int:
        return self._first

    def done(self, tags: Iterable[int]) -> None:
        """Mark ``tags`` complete (again is a no-op)."""
        for tag in tags:
            tag = operator.index(tag)
            if tag < self._first:
                raise tag_below_window(tag, self._first)
            i = tag - self._first
            if i >= len(self._state):
                self._state.extend([0] * (i + 1 - len(self._state)))
            self._state[i] |= _DONE

    def ack_prefix(self) -> int:
        """Close the complete prefix; return the tag to ack with ``multiple`` (0: nothing to
        send)."""
        n, last = 0, 0
        while n < len(self._state) and self._state[n] & _DONE:
            if not self._state[n] & _ACKED:
                last = self._first + n
            n += 1
        del self._state[:n]
        self._first += n
        return last

    def take_stragglers(self) -> list[int]:
        """The completed tags past the prefix that were not handed out before, ascending."""
        out = []
        for i, s in enumerate(self._state):
            if s == _DONE:
                self._state[i] = _DONE | _ACKED
                out.append(self._first + i)
        return out

    def waiting(self) -> int:
        """Completed tags not yet covered by an ack (the stragglers, and a prefix not closed)."""
        return sum(1 for s in self._state if s == _DONE)


# -- fastq.Pool's codec choice --------------------------------------------------------------------

_PLAIN = frozenset({int, float, str, bytes, bool, type(None)})
_PLAIN_ARGS = _PLAIN | {memoryview}


def plain_values(items: list[object], buffers: bool = False) -> bool:
    """True when every item is an int, float, str, bytes, bool or None (with ``buffers``, also a
    memoryview): the values msgpack carries back as the same type."""
    if not isinstance(items, list):
        raise TypeError(f"items must be a list, got {type(items).__name__}")
    return set(map(type, items)) <= (_PLAIN_ARGS if buffers else _PLAIN)
