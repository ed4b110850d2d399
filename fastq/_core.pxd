# The memory-layout contract of a ring. fastq/_core_py.py numbers the same u64 slots
# (SLOT_*); tests/unit/test_ring_layout.py checks both against each other.
from libc.stdint cimport uint8_t, uint64_t


cdef extern from "_atomic.h" nogil:
    uint64_t fq_load_acquire(const uint64_t* p)
    uint64_t fq_load_relaxed(const uint64_t* p)
    void fq_store_release(uint64_t* p, uint64_t v)
    void fq_store_relaxed(uint64_t* p, uint64_t v)
    uint64_t fq_exchange(uint64_t* p, uint64_t v)
    void fq_fence()
    void fq_pause()
    void fq_prefetch(const void* p)
    void fq_prefetch_write(void* p)


cdef extern from "sys/un.h" nogil:
    cdef struct sockaddr_un:
        unsigned short sun_family
        char sun_path[108]


cdef struct RingHeader:
    # line 0: written once by the creator, except closed (either end)
    uint64_t magic
    uint64_t capacity
    uint64_t closed
    uint64_t _pad0[5]
    # line 1: the producer's
    uint64_t head              # bytes ever written; head - tail = bytes in use
    uint64_t frames_put
    uint64_t puts_blocked
    uint64_t peak_used
    uint64_t producer_pid
    uint64_t producer_waiting  # set by the producer before it sleeps; cleared by whoever wakes it
    uint64_t _pad1[2]
    # line 2: the consumer's
    uint64_t tail              # bytes ever read
    uint64_t frames_got
    uint64_t gets_blocked
    uint64_t consumer_pid
    uint64_t consumer_waiting
    uint64_t _pad2[11]


cdef class Ring:
    cdef RingHeader* _hdr
    cdef uint8_t* _data
    cdef uint64_t _cap
    cdef object _mmap
    cdef Py_buffer _buf
    cdef bint _mapped
    cdef bint _closing                # close() was called while a call on this handle ran
    cdef int _calls[2]                # a put (get) call is running on this handle
    cdef readonly str name
    cdef object _finalizer
    cdef int _fds[2]                  # this handle's wake-up sockets by role; -1 until it takes one
    cdef sockaddr_un _wake_addr[2]    # where each role takes its wake-ups
    cdef unsigned int _wake_len[2]
    cdef public double spin_seconds
    # scratch arrays: the producer's frames, the consumer's destinations
    cdef const char** _put_ptrs
    cdef Py_ssize_t* _put_lens
    cdef Py_ssize_t _put_cap
    # a header written before each frame's payload, _put_pre_len bytes per frame (Dispatcher)
    cdef const char* _put_pre
    cdef Py_ssize_t _put_pre_len
    cdef char** _get_ptrs
    cdef Py_ssize_t* _get_lens
    cdef uint64_t* _get_srcs
    cdef Py_ssize_t _get_cap

    cdef int _setup(self, str name, object segment) except -1
    cdef int _check_open(self) except -1
    cdef int _release(self) except -1
    cdef int _enter(self, int role) except -1
    cdef int _leave(self, int role) except -1
    cdef int _take_role(self, int role) except -1
    cdef Py_ssize_t _put(self, object frames, object timeout, bint wait) except -1
    cdef Py_ssize_t _put_frames(self, tuple frames, double deadline, bint wait) except -1
    cdef Py_ssize_t _put_prefixed(self, const char* pre, Py_ssize_t pre_len, tuple bodies) except -1
    cdef Py_ssize_t _write(self, Py_ssize_t start, Py_ssize_t n) noexcept nogil
    cdef list _read(self, Py_ssize_t max_frames)
    cdef int _wait(self, int role, double deadline, uint64_t need) except -1
    cdef bint _ready(self, int role, uint64_t need) noexcept nogil
    cdef void _wake(self, int role) noexcept nogil
    cdef bint _alive(self, int role) except -1
