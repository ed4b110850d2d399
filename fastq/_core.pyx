# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: embedsignature=True, initializedcheck=False
"""Shared-memory single-producer single-consumer ring of byte frames: the hot path only.

It moves bytes and decides nothing. fastq/_core_py.py is the slow, obvious twin; any difference in
behaviour between the two is a bug here. What both share comes from fastq/_layout.py (layout
constants, names, value types, error messages) and fastq/_segment.py (the segment's and the
wake-up sockets' life cycle); this module never imports the twin.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_CheckExact,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.exc cimport PyErr_CheckSignals
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.ref cimport Py_INCREF
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport close as close_fd

import os

from fastq import _layout as _ref
from fastq import _segment as _seg
from fastq._layout import RingStatistics
from fastq.errors import PeerLost, RingBusy, RingClosed, RingCorrupt, RingEmpty, RingFull

__all__ = ["AckWindow", "Dispatcher", "DispatcherStatistics", "Ring", "RingStatistics", "plain_values"]


cdef extern from "sys/socket.h" nogil:
    ssize_t sendto(int fd, const void* buf, size_t n, int flags, const void* addr, unsigned int addrlen)
    ssize_t recv(int fd, void* buf, size_t n, int flags)
    int MSG_DONTWAIT
    int AF_UNIX

cdef extern from "poll.h" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    short POLLIN


cdef enum:
    PRODUCER = 0
    CONSUMER = 1
    FRAME_HEADER_BYTES = 4
    FRAME_ALIGN = 8
    # Batches with fewer payload bytes are copied with the GIL held: releasing it costs more.
    NOGIL_BYTES = 16384
    # Both ends publish progress at least this often, so that a large batch is copied in by one
    # end while the other is already copying it out.
    PUBLISH_BYTES = 65536
    # Payloads up to this size are copied as soon as their bytes object exists.
    INLINE_BYTES = 4096
    # How far ahead of the frame it reads the consumer asks for cache lines.
    PREFETCH_BYTES = 2048

# Python objects used on slow paths, cached as C globals (uvloop's stdlib.pxi).
cdef Py_ssize_t HEADER_BYTES = _ref.HEADER_BYTES
cdef double WAIT_SLICE_SECONDS = _ref.WAIT_SLICE_SECONDS
cdef tuple ROLE_NAMES = (_ref.PRODUCER, _ref.CONSUMER)
cdef object _check_timeout = _ref.check_timeout
cdef object _frame_view = _ref.frame_view
cdef object _too_large = _ref.too_large
cdef object _full = _ref.full
cdef object _check_max_frames = _ref.check_max_frames

assert sizeof(RingHeader) == _ref.HEADER_BYTES, "RingHeader and _layout.HEADER_BYTES disagree"


cdef inline uint64_t _record(uint64_t size) noexcept nogil:
    return (FRAME_HEADER_BYTES + size + FRAME_ALIGN - 1) & ~(<uint64_t>FRAME_ALIGN - 1)


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)  # the clock time.monotonic() reads: deadlines mix freely
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline uint64_t _copy_in(uint8_t* data, uint64_t cap, uint64_t p, const char* src, uint64_t n) noexcept nogil:
    """Copy ``n`` bytes to ring offset ``p`` (< cap), wrapping at the end; returns the next offset."""
    cdef uint64_t first = cap - p
    if n < first:
        first = n
    memcpy(data + p, src, first)
    if n > first:  # the payload wraps around the end of the data area
        memcpy(data, src + first, n - first)
        return n - first
    p += n
    return p if p < cap else 0


cdef int _grow(void** block, Py_ssize_t n, size_t item) except -1:
    cdef void* grown = PyMem_Realloc(block[0], n * item)
    if grown == NULL:
        raise MemoryError()  # the old block stays valid and owned
    block[0] = grown
    return 0


cdef inline void _drain(int fd) noexcept nogil:
    cdef char buf[64]
    while recv(fd, buf, sizeof(buf), MSG_DONTWAIT) > 0:
        pass


def _header_offsets():
    """Byte offsets of the RingHeader fields (for tests/unit/test_ring_layout.py)."""
    cdef RingHeader h
    cdef size_t base = <size_t>&h
    return {
        "magic": <size_t>&h.magic - base, "capacity": <size_t>&h.capacity - base,
        "closed": <size_t>&h.closed - base, "head": <size_t>&h.head - base,
        "frames_put": <size_t>&h.frames_put - base, "puts_blocked": <size_t>&h.puts_blocked - base,
        "peak_used": <size_t>&h.peak_used - base, "producer_pid": <size_t>&h.producer_pid - base,
        "producer_waiting": <size_t>&h.producer_waiting - base, "tail": <size_t>&h.tail - base,
        "frames_got": <size_t>&h.frames_got - base, "gets_blocked": <size_t>&h.gets_blocked - base,
        "consumer_pid": <size_t>&h.consumer_pid - base,
        "consumer_waiting": <size_t>&h.consumer_waiting - base,
    }


cdef class Ring:
    """A single-producer single-consumer ring of byte frames in shared memory.

    One process puts, one process gets; either may have created the ring. Frames are any
    bytes-like objects; ``get_many`` returns them as ``bytes`` in put order. See fastq/_core_py.py
    for the full contract of every method: this class behaves the same, faster.
    """

    def __cinit__(self):
        self._mapped = False
        self._closing = False
        self._fds[0] = self._fds[1] = -1
        self._calls[0] = self._calls[1] = 0
        self.spin_seconds = _ref.SPIN_SECONDS
        self._put_pre = NULL
        self._put_pre_len = 0

    def __init__(self):
        raise TypeError("use Ring.create(size_bytes) or Ring.attach(name)")

    def __dealloc__(self):
        # Dropped without close(): the sockets go (the peer sees this end as gone), the ring stays
        # open for the other end, and the mapping goes with the mmap object.
        for role in (PRODUCER, CONSUMER):
            if self._fds[role] >= 0:
                close_fd(self._fds[role])
        if self._mapped:
            PyBuffer_Release(&self._buf)
        PyMem_Free(self._put_ptrs)
        PyMem_Free(self._put_lens)
        PyMem_Free(self._get_ptrs)
        PyMem_Free(self._get_lens)
        PyMem_Free(self._get_srcs)

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def create(cls, size_bytes, *, name=None):
        """Create a ring with ``size_bytes`` of frame space (see ``fastq._core_py.Ring.create``)."""
        cdef Ring self
        capacity = _ref.check_size(size_bytes)
        name = _seg.new_name() if name is None else _ref.check_name(name)
        self = Ring.__new__(Ring)
        self._setup(name, _seg.open_segment(name, HEADER_BYTES + capacity))
        self._finalizer = _seg.register_creator(name)
        self._hdr.capacity = capacity
        fq_store_release(&self._hdr.magic, _ref.MAGIC)  # last: whoever sees it sees the rest
        self._cap = capacity
        return self

    @classmethod
    def attach(cls, name):
        """Open the ring another process created (see ``_core_py.Ring.attach``)."""
        cdef Ring self
        _ref.check_name(name)
        segment = _seg.open_segment(name, None)
        self = Ring.__new__(Ring)
        self._setup(name, segment)
        try:
            _ref.check_header(
                name, fq_load_acquire(&self._hdr.magic), self._hdr.capacity, len(segment)
            )
        except BaseException:
            self._release()
            raise
        self._cap = self._hdr.capacity
        return self

    cdef int _setup(self, str name, object segment) except -1:
        PyObject_GetBuffer(segment, &self._buf, PyBUF_WRITABLE)
        self._mapped = True
        self._mmap = segment
        self._hdr = <RingHeader*>self._buf.buf
        self._data = <uint8_t*>self._buf.buf + HEADER_BYTES
        self.name = name
        for role in (PRODUCER, CONSUMER):
            address = _ref.wakeup_address(name, ROLE_NAMES[role])
            # check_name keeps names short enough; this guards the copy below regardless
            assert len(address) <= sizeof(self._wake_addr[role].sun_path), "wake-up address too long"
            memset(&self._wake_addr[role], 0, sizeof(sockaddr_un))
            self._wake_addr[role].sun_family = AF_UNIX
            memcpy(self._wake_addr[role].sun_path, <char*>address, len(address))
            self._wake_len[role] = sizeof(self._wake_addr[role].sun_family) + len(address)
        return 0

    cdef int _release(self) except -1:
        for role in (PRODUCER, CONSUMER):
            if self._fds[role] >= 0:
                close_fd(self._fds[role])
                self._fds[role] = -1
        if self._mapped:
            self._mapped = False
            self._hdr = NULL
            self._data = NULL
            PyBuffer_Release(&self._buf)
            self._mmap.close()
        return 0

    def close(self):
        """Close the ring for both ends, wake the peer, and unmap it from this process.

        A call still running on this handle (another thread, or the code around a signal handler
        that closes) ends with ``RingClosed``; the unmap waits for it.
        """
        if not self._mapped or self._closing:
            return
        self._closing = True
        fq_store_release(&self._hdr.closed, 1)
        fq_fence()
        for role in (PRODUCER, CONSUMER):
            if fq_exchange(&self._hdr.producer_waiting if role == PRODUCER else &self._hdr.consumer_waiting, 0):
                _seg.send_wakeup(_ref.wakeup_address(self.name, ROLE_NAMES[role]))
        if not (self._calls[PRODUCER] or self._calls[CONSUMER]):
            self._release()

    def unlink(self):
        """Remove the ring's name so that nothing is left in /dev/shm (the creator's job)."""
        _seg.unlink_segment(self.name, self._finalizer is not None)
        if self._finalizer is not None:
            self._finalizer.cancel()
            self._finalizer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        """Close; the creator also unlinks."""
        self.close()
        if self._finalizer is not None:
            self.unlink()

    # -- properties -------------------------------------------------------------------------

    @property
    def capacity_bytes(self):
        return self._cap

    @property
    def max_frame_bytes(self):
        return self._cap - FRAME_HEADER_BYTES

    @property
    def closed(self):
        """True when this handle or the other end closed the ring."""
        return not self._mapped or self._closing or bool(fq_load_acquire(&self._hdr.closed))

    cdef int _check_open(self) except -1:
        if not self._mapped or self._closing:
            raise RingClosed(f"this handle of ring {self.name!r} was closed")
        return 0

    cdef int _enter(self, int role) except -1:
        """Start a put (or get) call; one thread at a time per end, and close() waits for it."""
        self._check_open()
        if self._calls[role]:
            raise RingBusy(
                f"another thread is already the {ROLE_NAMES[role]} on this handle of ring "
                f"{self.name!r}; use one thread per end of a ring"
            )
        self._calls[role] = 1
        return 0

    cdef int _leave(self, int role) except -1:
        self._calls[role] = 0
        if self._closing and not self._calls[1 - role]:
            self._release()  # close() came while this call ran
        return 0

    cdef int _take_role(self, int role) except -1:
        cdef uint64_t* pid
        if self._fds[role] >= 0:
            return 0
        pid = &self._hdr.producer_pid if role == PRODUCER else &self._hdr.consumer_pid
        self._fds[role] = _seg.bind_wakeup(self.name, ROLE_NAMES[role], pid[0]).detach()
        pid[0] = os.getpid()
        return 0

    # -- producer ---------------------------------------------------------------------------

    def put_many(self, frames, *, timeout=None):
        """Put all ``frames`` in order, waiting for room; on ``RingFull`` frames
        ``[0:exc.written]`` were written and the rest were not. Returns ``len(frames)``."""
        return self._put(frames, timeout, True)

    def put_many_nowait(self, frames):
        """Put the longest prefix of ``frames`` that fits now; ``RingFull`` if that is not all."""
        return self._put(frames, None, False)

    def put(self, frame, *, timeout=None):
        self._put((frame,), timeout, True)

    def put_nowait(self, frame):
        self._put((frame,), None, False)

    cdef Py_ssize_t _put(self, object frames, object timeout, bint wait) except -1:
        cdef double deadline = -1.0
        if wait and timeout is not None:
            deadline = _check_timeout(timeout)
        self._check_open()
        # A private, immutable sequence: nothing the caller does meanwhile can free a frame.
        if type(frames) is not tuple:
            frames = tuple(frames)
        self._enter(PRODUCER)
        try:
            return self._put_frames(<tuple>frames, deadline, wait)
        finally:
            self._leave(PRODUCER)

    cdef Py_ssize_t _put_frames(self, tuple frames, double deadline, bint wait) except -1:
        cdef Py_ssize_t i, n = len(frames), written = 0, total = 0
        cdef Py_buffer view
        cdef bint blocked = False
        if n > self._put_cap:
            _grow(<void**>&self._put_ptrs, n, sizeof(char*))
            _grow(<void**>&self._put_lens, n, sizeof(Py_ssize_t))
            self._put_cap = n
        keep = []  # views of non-bytes frames, alive until the copy is done
        for i in range(n):
            frame = frames[i]
            if PyBytes_CheckExact(frame):
                self._put_ptrs[i] = PyBytes_AS_STRING(frame)
                self._put_lens[i] = PyBytes_GET_SIZE(frame)
            else:
                frame = _frame_view(i, frame)
                keep.append(frame)
                PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
                self._put_ptrs[i] = <const char*>view.buf
                self._put_lens[i] = view.len
                PyBuffer_Release(&view)  # the memoryview in keep holds the export
        for i in range(n):
            if _record(self._put_pre_len + self._put_lens[i]) > self._cap:
                raise _too_large(self.name, i, self._put_pre_len + self._put_lens[i], self._cap)
            total += self._put_pre_len + self._put_lens[i]
        if n == 0:
            return 0
        self._take_role(PRODUCER)
        while True:
            if fq_load_acquire(&self._hdr.closed):
                raise RingClosed(f"ring {self.name!r} is closed; no more frames can be put")
            if total >= NOGIL_BYTES:
                with nogil:
                    written = self._write(written, n)
            else:
                written = self._write(written, n)
            if written == n:
                return n
            if not wait:
                raise _full(self.name, written, n, False)
            if not blocked:
                self._hdr.puts_blocked += 1
                blocked = True
            if not self._wait(PRODUCER, deadline, _record(self._put_pre_len + self._put_lens[written])):
                raise _full(self.name, written, n, True)

    cdef Py_ssize_t _put_prefixed(self, const char* pre, Py_ssize_t pre_len, tuple bodies) except -1:
        """Put frames ``pre[i*pre_len:(i+1)*pre_len] + bodies[i]`` without waiting, each copied
        straight into the ring; returns how many went in (a prefix), 0 when the ring is closed."""
        try:
            self._enter(PRODUCER)
        except RingClosed:
            return 0
        self._put_pre, self._put_pre_len = pre, pre_len
        try:
            return self._put_frames(bodies, -1.0, False)
        except RingFull as e:
            return e.written
        except RingClosed:
            return 0
        finally:
            self._put_pre, self._put_pre_len = NULL, 0
            self._leave(PRODUCER)

    cdef Py_ssize_t _write(self, Py_ssize_t start, Py_ssize_t n) noexcept nogil:
        cdef RingHeader* h = self._hdr
        cdef uint8_t* data = self._data
        cdef uint64_t cap = self._cap, head = h.head, size, rec, p
        cdef uint64_t pre_len = <uint64_t>self._put_pre_len
        cdef uint64_t published = head
        cdef uint64_t free = cap - (head - fq_load_acquire(&h.tail))
        cdef uint64_t pos = head % cap
        cdef Py_ssize_t i = start, counted = start
        while i < n:
            size = pre_len + <uint64_t>self._put_lens[i]
            rec = _record(size)
            if rec > free:
                free = cap - (head - fq_load_acquire(&h.tail))  # the consumer may have moved on
                if rec > free:
                    break
            if pos + PREFETCH_BYTES < cap:
                fq_prefetch_write(data + pos + PREFETCH_BYTES)
            (<uint32_t*>(data + pos))[0] = <uint32_t>size
            p = pos + FRAME_HEADER_BYTES  # < cap: pos and cap are multiples of 8
            if pre_len:
                p = _copy_in(data, cap, p, self._put_pre + <uint64_t>i * pre_len, pre_len)
            _copy_in(data, cap, p, self._put_ptrs[i], size - pre_len)
            pos += rec
            if pos >= cap:
                pos -= cap
            head += rec
            free -= rec
            i += 1
            if head - published >= PUBLISH_BYTES or i == n:
                # Count before publishing, so that frames_got never passes frames_put.
                fq_store_relaxed(&h.frames_put, h.frames_put + <uint64_t>(i - counted))
                counted = i
                published = head
                fq_store_release(&h.head, head)  # publish: the frames above are complete
                self._wake(CONSUMER)
        if i > counted:
            fq_store_relaxed(&h.frames_put, h.frames_put + <uint64_t>(i - counted))
            fq_store_release(&h.head, head)
            self._wake(CONSUMER)
        if i > start and cap - free > h.peak_used:
            fq_store_relaxed(&h.peak_used, cap - free)
        return i

    # -- consumer ---------------------------------------------------------------------------

    def get_many(self, max_frames=1024, *, timeout=None):
        """Return 1 to ``max_frames`` frames in put order, waiting for the first one."""
        cdef double deadline = -1.0
        cdef Py_ssize_t limit = _check_max_frames(max_frames)
        cdef bint blocked = False
        cdef list frames
        if timeout is not None:
            deadline = _check_timeout(timeout)
        self._enter(CONSUMER)
        try:
            self._take_role(CONSUMER)
            while True:
                frames = self._read(limit)
                if frames is not None:
                    return frames
                if fq_load_acquire(&self._hdr.closed):
                    raise RingClosed(f"ring {self.name!r} is closed and drained")
                if not blocked:
                    self._hdr.gets_blocked += 1
                    blocked = True
                if not self._wait(CONSUMER, deadline, 0):
                    raise RingEmpty(f"ring {self.name!r} stayed empty until the timeout")
        finally:
            self._leave(CONSUMER)

    def get_many_nowait(self, max_frames=1024):
        """Return the frames there are now (at most ``max_frames``); ``RingEmpty`` if none."""
        cdef Py_ssize_t limit = _check_max_frames(max_frames)
        cdef list frames
        self._enter(CONSUMER)
        try:
            self._take_role(CONSUMER)
            frames = self._read(limit)
            if frames is not None:
                return frames
            if fq_load_acquire(&self._hdr.closed):
                raise RingClosed(f"ring {self.name!r} is closed and drained")
            raise RingEmpty(f"ring {self.name!r} is empty")
        finally:
            self._leave(CONSUMER)

    def get(self, *, timeout=None):
        return self.get_many(1, timeout=timeout)[0]

    def get_nowait(self):
        return self.get_many_nowait(1)[0]

    cdef list _read(self, Py_ssize_t limit):
        """Up to ``limit`` frames, or None when the ring is empty.

        Frames before a corrupt length are returned (and consumed); the error comes with the
        next call, when the corrupt frame is the first one.
        """
        cdef RingHeader* h = self._hdr
        cdef uint8_t* data = self._data
        cdef uint64_t cap = self._cap, tail = h.tail, head = fq_load_acquire(&h.head)
        cdef uint64_t pos, src, t, size = 0, rec
        cdef Py_ssize_t n = 0, n0 = 0, k = 0, k0, total, most
        cdef bint corrupt = False
        cdef list out
        if head == tail:
            return None
        most = <Py_ssize_t>((head - tail) // FRAME_ALIGN)  # every frame takes 8 bytes or more
        if most > limit:
            most = limit
        if most < 1:
            most = 1  # fewer than 8 unread bytes: a broken ring, reported below
        if most > self._get_cap:
            _grow(<void**>&self._get_ptrs, most, sizeof(char*))
            _grow(<void**>&self._get_lens, most, sizeof(Py_ssize_t))
            _grow(<void**>&self._get_srcs, most, sizeof(uint64_t))
            self._get_cap = most
        # The list is sized for the most frames there can be, filled, then cut to what was read.
        out = PyList_New(most)
        pos = tail % cap
        t = tail
        try:
            while t != head and n < most and not corrupt:
                # Pass 1, GIL held: allocate the bytes objects of one chunk. Small payloads are
                # copied right away while their cache lines are hot; large ones wait for pass 2.
                k0, total = k, 0
                while t != head and n < most and total < PUBLISH_BYTES:
                    size = (<uint32_t*>(data + pos))[0]
                    rec = _record(size)
                    if rec > head - t:
                        corrupt = True
                        break
                    src = pos + FRAME_HEADER_BYTES
                    if pos + PREFETCH_BYTES < cap:
                        fq_prefetch(data + pos + PREFETCH_BYTES)
                    if size <= INLINE_BYTES and src + size <= cap:
                        frame = PyBytes_FromStringAndSize(<char*>data + src, size)
                    else:
                        frame = PyBytes_FromStringAndSize(NULL, size)
                        self._get_ptrs[k] = PyBytes_AS_STRING(frame)
                        self._get_lens[k] = size
                        self._get_srcs[k] = src
                        total += size
                        k += 1
                    Py_INCREF(frame)  # PyList_SET_ITEM steals a reference
                    PyList_SET_ITEM(out, n, frame)
                    pos += rec
                    if pos >= cap:
                        pos -= cap
                    t += rec
                    n += 1
                # Pass 2: copy the large payloads, without the GIL when that pays; free the space.
                if total >= NOGIL_BYTES:
                    with nogil:
                        _copy_out(data, cap, self._get_srcs + k0, self._get_ptrs + k0, self._get_lens + k0, k - k0)
                else:
                    _copy_out(data, cap, self._get_srcs + k0, self._get_ptrs + k0, self._get_lens + k0, k - k0)
                if n > n0:
                    fq_store_relaxed(&h.frames_got, h.frames_got + <uint64_t>(n - n0))
                    fq_store_release(&h.tail, t)  # the producer may reuse the space only now
                    n0 = n
                    self._wake(PRODUCER)
        except BaseException:  # an allocation failed: keep what was consumed, or raise
            _list_truncate(out, n)
            if n0 == 0:
                raise
            del out[n0:]
            return out
        _list_truncate(out, n)
        if corrupt and n == 0:
            raise RingCorrupt(
                f"ring {self.name!r} holds a frame of {size} bytes at offset {pos} but only "
                f"{head - t} bytes are unread: another writer broke the ring"
            )
        return out

    # -- waiting ----------------------------------------------------------------------------

    def fileno(self):
        """The consumer's wake-up descriptor, for ``loop.add_reader``; see ``request_wakeup``."""
        self._check_open()
        self._take_role(CONSUMER)
        return self._fds[CONSUMER]

    def request_wakeup(self):
        """Ask the producer to make ``fileno()`` readable at its next put; False, asking
        nothing, when a frame (or the close) is already there."""
        self._check_open()
        self._take_role(CONSUMER)
        fq_store_relaxed(&self._hdr.consumer_waiting, 1)
        fq_fence()
        if self._ready(CONSUMER, 0):
            fq_store_relaxed(&self._hdr.consumer_waiting, 0)
            return False
        self._hdr.gets_blocked += 1
        return True

    def clear_wakeup(self):
        """Withdraw a pending ``request_wakeup`` and take the one wake-up it produced, if any."""
        cdef char buf[64]
        self._check_open()
        self._take_role(CONSUMER)
        fq_store_relaxed(&self._hdr.consumer_waiting, 0)
        recv(self._fds[CONSUMER], buf, sizeof(buf), MSG_DONTWAIT)

    def producer_alive(self):
        """True while a producer process holds this ring (its wake-up address is bound)."""
        return self._alive(PRODUCER)

    def consumer_alive(self):
        """True while a consumer process holds this ring (its wake-up address is bound)."""
        return self._alive(CONSUMER)

    cdef bint _alive(self, int role) except -1:
        if self._fds[role] >= 0:
            return True
        return _seg.probe(_ref.wakeup_address(self.name, ROLE_NAMES[role]))

    cdef bint _ready(self, int role, uint64_t need) noexcept nogil:
        cdef RingHeader* h = self._hdr
        if fq_load_acquire(&h.closed):
            return True
        if role == CONSUMER:
            return fq_load_acquire(&h.head) != h.tail
        return self._cap - (h.head - fq_load_acquire(&h.tail)) >= need

    cdef void _wake(self, int role) noexcept nogil:
        """Signal the ``role`` end if it said it is about to sleep; one syscall per sleep."""
        cdef uint64_t* flag = &self._hdr.producer_waiting if role == PRODUCER else &self._hdr.consumer_waiting
        cdef int fd = self._fds[1 - role]
        cdef char one = 1
        fq_fence()  # our publish above must be visible before we read the flag (Dekker)
        if fd >= 0 and fq_load_relaxed(flag) and fq_exchange(flag, 0):
            sendto(fd, &one, 1, MSG_DONTWAIT, &self._wake_addr[role], self._wake_len[role])

    cdef int _wait(self, int role, double deadline, uint64_t need) except -1:
        """Return 1 when ready (or closed), 0 at the deadline (< 0: none); raise PeerLost.

        Runs inside _enter/_leave: a close() from a signal handler or another thread leaves the
        mapping in place until the call returns.
        """
        cdef RingHeader* h = self._hdr
        cdef uint64_t* flag = &h.producer_waiting if role == PRODUCER else &h.consumer_waiting
        cdef uint64_t* peer_pid = &h.consumer_pid if role == PRODUCER else &h.producer_pid
        cdef double now, end, wait
        cdef int r, spins = 0
        cdef pollfd pfd
        pfd.fd = self._fds[role]
        pfd.events = POLLIN
        if self.spin_seconds > 0:  # a short spin saves a sleep/wake pair when the peer is busy
            with nogil:
                end = _now() + self.spin_seconds
                if 0 <= deadline < end:
                    end = deadline
                while True:
                    if self._ready(role, need):
                        return 1
                    fq_pause()
                    spins += 1
                    if spins % 64 == 0 and _now() >= end:
                        break
        while True:
            fq_store_relaxed(flag, 1)
            fq_fence()  # the flag must be visible before we look at the ring (Dekker)
            if self._ready(role, need):
                fq_store_relaxed(flag, 0)
                return 1
            now = _now()
            if 0 <= deadline <= now:
                fq_store_relaxed(flag, 0)
                return 0
            wait = WAIT_SLICE_SECONDS
            if deadline >= 0 and deadline - now < wait:
                wait = deadline - now
            with nogil:
                pfd.revents = 0
                r = poll(&pfd, 1, <int>(wait * 1000.0 + 0.999))
                fq_store_relaxed(flag, 0)
                _drain(pfd.fd)
            if r < 0:
                PyErr_CheckSignals()  # EINTR: let a KeyboardInterrupt through
            if self._closing or self._ready(role, need):
                return 1
            if r == 0 and peer_pid[0] and not self._alive(1 - role):
                raise PeerLost(
                    f"the {ROLE_NAMES[1 - role]} of ring {self.name!r} (pid {peer_pid[0]}) is gone"
                )

    # -- introspection ----------------------------------------------------------------------

    def statistics(self):
        cdef RingHeader* h
        cdef uint64_t tail, got
        self._check_open()
        h = self._hdr
        # The consumer's counters first: head and frames_put only grow, so nothing goes negative.
        tail = fq_load_acquire(&h.tail)
        got = fq_load_acquire(&h.frames_got)
        return RingStatistics(
            used_bytes=fq_load_acquire(&h.head) - tail,
            capacity_bytes=self._cap,
            frames=fq_load_acquire(&h.frames_put) - got,
            peak_used_bytes=h.peak_used,
            puts_blocked=h.puts_blocked,
            gets_blocked=h.gets_blocked,
            frames_put=h.frames_put,
            frames_got=got,
            producer_pid=h.producer_pid,
            consumer_pid=h.consumer_pid,
            closed=bool(h.closed),
        )

    def __repr__(self):
        state = "closed" if self.closed else "open"
        return f"<Ring {self.name!r} {state} capacity_bytes={self._cap}>"


cdef extern from "Python.h":
    void Py_SET_SIZE(object o, Py_ssize_t size)


cdef inline void _list_truncate(list items, Py_ssize_t n) noexcept:
    # The slots past n were never filled (NULL); a list may hold more room than items.
    Py_SET_SIZE(items, n)


cdef void _copy_out(
    const uint8_t* data, uint64_t cap, const uint64_t* srcs, char** dst, const Py_ssize_t* lens,
    Py_ssize_t k,
) noexcept nogil:
    cdef Py_ssize_t j
    cdef uint64_t size, first
    for j in range(k):
        size = <uint64_t>lens[j]
        first = cap - srcs[j]
        if size < first:
            first = size
        memcpy(dst[j], data + srcs[j], first)
        if size > first:  # the payload wraps around the end of the data area
            memcpy(dst[j] + first, data, size - first)


include "_dispatch.pxi"
