# Included by _core.pyx: the dispatcher's per-delivery work. fastq/_core_py.py has its twin;
# the frame headers (DELIVERY, COMPLETION) and the error messages are fastq/_layout.py's.

from cpython.bytes cimport PyBytes_AsString
from cpython.mem cimport PyMem_Calloc
from cpython.set cimport PySet_Add, PySet_Contains, PySet_Discard
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from libc.stdint cimport uint16_t
from libc.string cimport memmove
from operator import index as operator_index


from fastq._layout import DispatcherStatistics

# The headers are written and read with the host's byte order: little-endian, as the twin's "<"
# formats say (x86-64 and aarch64; fastq is Linux-only and pins with affinity masks).
cdef packed struct DeliveryHeader:
    uint64_t tag
    uint32_t retries
    uint16_t queue

cdef packed struct CompletionHeader:
    uint64_t tag
    uint8_t status
    double delay

assert sizeof(DeliveryHeader) == _ref.DELIVERY.size, "DeliveryHeader and _layout.DELIVERY disagree"
assert sizeof(CompletionHeader) == _ref.COMPLETION.size, "CompletionHeader and _layout.COMPLETION disagree"
import sys as _sys
assert _sys.byteorder == "little", "the dispatcher's frame headers assume a little-endian host"

cdef object _check_worker = _ref.check_worker
cdef object _check_queue = _ref.check_queue
cdef object _short_completion = _ref.short_completion
cdef Py_ssize_t COMPLETION_BYTES = _ref.COMPLETION.size
cdef int _STATUS_OK = _ref.STATUS_OK


cdef class Dispatcher:
    """Routes deliveries into per-worker rings and keeps each worker's in-flight tags.

    See ``_core_py.Dispatcher`` for the contract; this class behaves the same, faster: it picks
    the worker in C and copies header and body straight into the ring, with no frame object made.
    """

    cdef Py_ssize_t _n, _queues
    cdef list _rings            # Ring or None, per worker
    cdef list _tags             # set of in-flight tags, per worker
    cdef Py_ssize_t* _load      # len(_tags[w]), kept in C for the choice
    cdef char* _accepting
    cdef char* _allowed         # [queue * _n + worker]
    cdef Py_ssize_t* _extra      # scratch: load added per worker during one dispatch()
    cdef Py_ssize_t* _pick       # scratch: the worker chosen per item (-1: none)
    cdef Py_ssize_t _pick_cap
    cdef Py_ssize_t _rotor      # where the search for the least busy worker starts (ties rotate)
    cdef uint64_t _dispatched, _completed, _stale

    def __cinit__(self, workers, queues=1):
        _ref.check_counts(workers, queues)
        self._n, self._queues = workers, queues
        self._rings = [None] * self._n
        self._tags = [set() for _ in range(self._n)]
        self._load = <Py_ssize_t*>PyMem_Calloc(self._n, sizeof(Py_ssize_t))
        self._accepting = <char*>PyMem_Calloc(self._n, 1)
        self._allowed = <char*>PyMem_Calloc(self._n * self._queues, 1)
        self._extra = <Py_ssize_t*>PyMem_Calloc(self._n, sizeof(Py_ssize_t))
        if self._load == NULL or self._accepting == NULL or self._allowed == NULL or self._extra == NULL:
            raise MemoryError()
        memset(self._allowed, 1, self._n * self._queues)

    def __dealloc__(self):
        PyMem_Free(self._load)
        PyMem_Free(self._accepting)
        PyMem_Free(self._allowed)
        PyMem_Free(self._extra)
        PyMem_Free(self._pick)

    def attach(self, worker, Ring ring not None):
        cdef Py_ssize_t w = _check_worker(worker, self._n)
        if self._rings[w] is not None:
            raise _ref.already_attached(w)
        self._rings[w] = ring
        self._accepting[w] = 1

    def detach(self, worker):
        cdef Py_ssize_t w = _check_worker(worker, self._n)
        tags = sorted(self._tags[w])
        self._tags[w] = set()
        self._load[w] = 0
        self._rings[w] = None
        self._accepting[w] = 0
        return tags

    def set_accepting(self, worker, accepting):
        cdef Py_ssize_t w = _check_worker(worker, self._n)
        self._accepting[w] = 1 if accepting and self._rings[w] is not None else 0

    def allow(self, queue, workers):
        cdef Py_ssize_t q = _check_queue(queue, self._queues), w
        allowed = {_check_worker(x, self._n) for x in workers}
        for w in range(self._n):
            self._allowed[q * self._n + w] = 1 if w in allowed else 0

    def in_flight(self, worker):
        return self._load[<Py_ssize_t>_check_worker(worker, self._n)]

    def holds(self, worker, tag):
        return tag in self._tags[<Py_ssize_t>_check_worker(worker, self._n)]

    def dispatch(self, items):
        cdef list todo = list(items)
        cdef Py_ssize_t n = len(todo), i, k, w, best, q
        cdef Py_ssize_t* load = self._load
        cdef Py_ssize_t* pick = self._picks(n)
        memset(self._extra, 0, self._n * sizeof(Py_ssize_t))
        for i in range(n):
            item = todo[i]
            if len(item) != 4:  # indexing below skips bounds checks (boundscheck=False)
                raise _ref.bad_item(item)
            q = _check_queue(item[2], self._queues)
            best = -1
            for k in range(self._n):
                w = self._rotor + k
                if w >= self._n:
                    w -= self._n
                if self._accepting[w] and self._allowed[q * self._n + w] and (
                    best < 0 or load[w] + self._extra[w] < load[best] + self._extra[best]
                ):
                    best = w
            if best >= 0:
                self._check_size(best, item)
                self._extra[best] += 1
                self._rotor = best + 1 if best + 1 < self._n else 0
            pick[i] = best
        return self._write(todo, pick)

    def dispatch_to(self, worker, items):
        cdef Py_ssize_t w = _check_worker(worker, self._n), i
        cdef list todo = list(items)
        cdef Py_ssize_t* pick = self._picks(len(todo))
        for item in todo:
            if len(item) != 4:
                raise _ref.bad_item(item)
            _check_queue(item[2], self._queues)
        if self._rings[w] is None:
            return todo
        for i in range(len(todo)):
            self._check_size(w, todo[i])
            pick[i] = w
        return self._write(todo, pick)

    cdef Py_ssize_t* _picks(self, Py_ssize_t n) except NULL:
        if n > self._pick_cap:
            _grow(<void**>&self._pick, n, sizeof(Py_ssize_t))
            self._pick_cap = n
        if self._pick == NULL:  # n == 0 before any batch
            _grow(<void**>&self._pick, 1, sizeof(Py_ssize_t))
            self._pick_cap = 1
        return self._pick

    cdef int _check_size(self, Py_ssize_t w, object item) except -1:
        cdef Ring ring = self._rings[w]
        cdef Py_buffer view
        body = item[3]  # an object, not a tuple: indexed with bounds checks, lists work too
        PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
        size = sizeof(DeliveryHeader) + view.len
        PyBuffer_Release(&view)
        if _record(size) > ring._cap:
            raise _ref.delivery_too_large(ring.name, item[0], size, ring._cap)
        return 0

    cdef list _write(self, list todo, Py_ssize_t* pick):
        """Write each item to the worker ``pick`` names (-1: none); return the unwritten ones."""
        cdef Py_ssize_t n = len(todo), i, j, k, w, written
        cdef Ring ring
        cdef DeliveryHeader* hdr
        cdef set tags
        cdef list mine
        for w in range(self._n):
            mine = [i for i in range(n) if pick[i] == w]
            k = len(mine)
            if k == 0:
                continue
            ring = self._rings[w]
            headers = PyBytes_FromStringAndSize(NULL, k * sizeof(DeliveryHeader))
            hdr = <DeliveryHeader*>PyBytes_AsString(headers)
            bodies = PyTuple_New(k)
            for j in range(k):
                item = todo[<Py_ssize_t>mine[j]]
                hdr[j].tag = item[0]
                hdr[j].retries = item[1]
                hdr[j].queue = item[2]
                body = item[3]
                Py_INCREF(body)  # PyTuple_SET_ITEM steals a reference
                PyTuple_SET_ITEM(bodies, j, body)
            written = ring._put_prefixed(<const char*>hdr, sizeof(DeliveryHeader), bodies)
            tags = self._tags[w]
            for j in range(written):
                PySet_Add(tags, todo[<Py_ssize_t>mine[j]][0])
            self._load[w] = len(tags)  # a tag given twice is held once, as in the twin
            self._dispatched += written
            for j in range(written, k):
                pick[<Py_ssize_t>mine[j]] = -1
        return [todo[i] for i in range(n) if pick[i] < 0]

    def complete(self, worker, frames):
        cdef Py_ssize_t w = _check_worker(worker, self._n)
        cdef set tags = self._tags[w]
        cdef list ok = [], other = []
        cdef Py_buffer view
        cdef CompletionHeader hdr
        for frame in frames:
            PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
            try:
                if view.len < COMPLETION_BYTES:
                    raise _short_completion(w, view.len)
                memcpy(&hdr, view.buf, sizeof(CompletionHeader))
                if hdr.tag:
                    tag = hdr.tag
                    if not PySet_Contains(tags, tag):
                        self._stale += 1
                        continue
                    PySet_Discard(tags, tag)
                    self._load[w] -= 1
                    self._completed += 1
                    if hdr.status == _STATUS_OK:
                        ok.append(tag)
                        continue
                other.append((hdr.tag, hdr.status, hdr.delay,
                              PyBytes_FromStringAndSize(<char*>view.buf + COMPLETION_BYTES, view.len - COMPLETION_BYTES)))
            finally:
                PyBuffer_Release(&view)
        return ok, other

    def statistics(self):
        return DispatcherStatistics(self._dispatched, self._completed, self._stale,
                                    tuple(self._load[i] for i in range(self._n)))


cdef enum:
    TAG_DONE = 1
    TAG_ACKED = 2


cdef class AckWindow:
    """The completed tags of a sequence and the acks they allow.

    See ``_core_py.AckWindow`` for the contract. The state is one byte per tag from ``first``
    in a buffer that is compacted only when the window has moved past half of it.
    """

    cdef uint64_t _first
    cdef uint8_t* _buf
    cdef Py_ssize_t _start, _len, _cap

    def __cinit__(self, first=1):
        first = operator_index(first)
        if first < 1:
            raise ValueError(f"first must be >= 1, got {first}")
        self._first = first
        self._start = self._len = self._cap = 0

    def __dealloc__(self):
        PyMem_Free(self._buf)

    @property
    def first(self):
        return self._first

    cdef int _room(self, Py_ssize_t n) except -1:
        """Make state slots [0, n) exist (zeroed when new)."""
        cdef Py_ssize_t cap
        if n <= self._len:
            return 0
        if self._start + n > self._cap:
            if self._start:  # slide the window to the front first
                memmove(self._buf, self._buf + self._start, self._len)
                self._start = 0
            if n > self._cap:
                cap = max(n, 2 * self._cap, 64)
                _grow(<void**>&self._buf, cap, 1)
                self._cap = cap
        memset(self._buf + self._start + self._len, 0, n - self._len)
        self._len = n
        return 0

    def done(self, tags):
        cdef uint64_t tag
        cdef Py_ssize_t i
        for t in tags:
            t = operator_index(t)
            if t < <object>self._first:
                raise _ref.tag_below_window(t, self._first)
            tag = t
            i = <Py_ssize_t>(tag - self._first)
            self._room(i + 1)
            self._buf[self._start + i] |= TAG_DONE

    def ack_prefix(self):
        cdef Py_ssize_t n = 0
        cdef uint8_t* s = self._buf + self._start
        cdef uint64_t last = 0
        while n < self._len and s[n] & TAG_DONE:
            if not s[n] & TAG_ACKED:
                last = self._first + n
            n += 1
        self._start += n
        self._len -= n
        self._first += n
        if self._len == 0:
            self._start = 0
        return last

    def take_stragglers(self):
        cdef Py_ssize_t i
        cdef uint8_t* s = self._buf + self._start
        cdef list out = []
        for i in range(self._len):
            if s[i] == TAG_DONE:
                s[i] = TAG_DONE | TAG_ACKED
                out.append(self._first + i)
        return out

    def waiting(self):
        cdef Py_ssize_t i, n = 0
        cdef uint8_t* s = self._buf + self._start
        for i in range(self._len):
            if s[i] == TAG_DONE:
                n += 1
        return n


def plain_values(list items not None, bint buffers=False):
    """True when every item is an int, float, str, bytes, bool or None (with ``buffers``, also a
    memoryview): the values msgpack carries back as the same type. ``fastq.Pool`` checks each
    batch with this before it picks msgpack over pickle; a pointer compare per item."""
    cdef object x
    for x in items:
        if type(x) is int or type(x) is float or type(x) is str or type(x) is bytes or x is None or type(x) is bool:
            continue
        if buffers and type(x) is memoryview:
            continue
        return False
    return True
