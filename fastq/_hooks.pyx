# cython: boundscheck=False, wraparound=False, cdivision=True
"""A worker's per-message hook path, in C: the record middleware sees, and the metrics' counting.

``Processing`` is what middleware sees of one message in a worker (fastq.middleware documents
it); here its fields are C fields, so that the hooks below read them without Python's attribute
lookups, and making one costs less. ``Tally`` is what a worker puts first in its middleware chain when its supervisor serves
/metrics: ``before_process`` stamps the message's wall clock, ``after_process`` counts the run by
outcome and bins its handler duration and its enqueue-to-start latency, ``after_reject`` counts a
message that never reached a handler. It counts and bins and decides nothing: which buckets, when
to report and how a report is framed is fastq.tally's business. fastq/_hooks_py.py is the slow,
obvious twin; any difference between them is a bug here.
"""

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    enum: CLOCK_REALTIME

__all__ = ["MAX_BOUNDS", "Processing", "Tally"]

cdef enum:
    _MAX = 32

#: the most bucket bounds a histogram may have
MAX_BOUNDS = _MAX


cdef inline double _now() noexcept nogil:
    """The unix time, as ``time.time()`` reads it."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline int _bin(const double *bounds, int n, double x) noexcept nogil:
    """``bisect_left(bounds, x)``: the first bound >= x (n: above them all)."""
    cdef int i = 0
    while i < n and bounds[i] < x:
        i += 1
    return i


cdef class Processing:
    """What middleware sees of one message in a worker.

    ``handler`` is the task's or consumer's name, ``message_id`` the envelope's id (empty for a
    consumer's raw body), ``queue`` where it came from, ``retries`` how many times it failed
    before (``attempt`` = retries + 1), ``headers`` the envelope's headers (empty for a raw
    body), ``enqueued_at`` the unix time ``send`` made it (0.0: unknown). In ``after_process``,
    ``outcome`` is "ok", "retried" or "dead" and ``result`` what the handler returned (None
    when it raised). ``started_at``, ``clock`` and ``span`` are for hooks (TimingMiddleware's,
    the metrics' and the traces' own).
    """

    cdef public str handler, message_id, queue, outcome
    cdef public long retries
    cdef public object headers, result, span
    cdef public double enqueued_at, started_at, clock

    def __init__(
        self,
        str handler,
        str message_id,
        str queue,
        long retries,
        headers=None,
        double enqueued_at=0.0,
    ):
        self.handler, self.message_id, self.queue, self.retries = handler, message_id, queue, retries
        self.headers = headers if headers is not None else {}
        self.enqueued_at = enqueued_at
        self.started_at = self.clock = 0.0
        self.result = None
        self.outcome = ""
        self.span = None

    @property
    def id(self):
        return self.message_id

    @property
    def task(self):
        return self.handler

    @property
    def attempt(self):
        """1 on the first delivery, 2 on the first retry..."""
        return self.retries + 1

    def __repr__(self):
        return (
            f"<Processing {self.handler} id={self.message_id!r} queue={self.queue!r} "
            f"attempt={self.attempt} outcome={self.outcome!r}>"
        )


cdef class _Acc:
    """One (queue, handler)'s counts since the last take."""

    cdef str queue
    cdef str task
    cdef long long processed, failed, retried, dead
    cdef long long handler_buckets[_MAX + 1]
    cdef long long latency_buckets[_MAX + 1]
    cdef double handler_sum, latency_sum

    def __cinit__(self, str queue, str task):
        self.queue, self.task = queue, task

    cdef tuple counts(self, int handlers, int latencies):
        return (
            self.queue,
            self.task,
            self.processed,
            self.failed,
            self.retried,
            self.dead,
            [self.handler_buckets[i] for i in range(handlers + 1)],
            self.handler_sum,
            [self.latency_buckets[i] for i in range(latencies + 1)],
            self.latency_sum,
        )


cdef class Tally:
    """Counts what a worker's handlers did, for the next report to the supervisor."""

    cdef double handler_bounds[_MAX]
    cdef double latency_bounds[_MAX]
    cdef int n_handler, n_latency
    cdef dict _counts  # handler -> its queue's counts (nearly always the only ones)
    cdef dict _others  # (queue, handler) -> counts, for a handler name met on a second queue

    def __init__(self, handler_bounds, latency_bounds):
        bounds = (tuple(handler_bounds), tuple(latency_bounds))
        for b in bounds:
            if len(b) > _MAX or list(b) != sorted(b):
                raise ValueError(
                    f"bucket bounds must be ascending and at most {_MAX}; got {b!r}"
                )
        self.n_handler, self.n_latency = len(bounds[0]), len(bounds[1])
        for i, x in enumerate(bounds[0]):
            self.handler_bounds[i] = x
        for i, x in enumerate(bounds[1]):
            self.latency_bounds[i] = x
        self._counts, self._others = {}, {}

    cdef _Acc _of(self, str queue, str task):
        cdef _Acc c = self._counts.get(task)
        if c is None:
            c = _Acc(queue, task)
            self._counts[task] = c
        elif c.queue != queue:
            c = self._others.get((queue, task))
            if c is None:
                c = _Acc(queue, task)
                self._others[(queue, task)] = c
        return c

    def before_process(self, Processing message):
        message.clock = _now()

    def after_process(self, Processing message, exc):
        # One wall clock for both: the start against the enqueue time, the end against the start.
        # A negative span (a clock stepped back, another host's clock ahead) falls in the first
        # bucket.
        cdef double started = message.clock
        cdef double took = _now() - started
        cdef double waited
        cdef _Acc c = self._counts.get(message.handler)
        if c is None or c.queue != message.queue:
            c = self._of(message.queue, message.handler)
        c.processed += 1
        c.handler_buckets[_bin(self.handler_bounds, self.n_handler, took)] += 1
        c.handler_sum += took
        if message.enqueued_at != 0.0:
            waited = started - message.enqueued_at
            c.latency_buckets[_bin(self.latency_bounds, self.n_latency, waited)] += 1
            c.latency_sum += waited
        if exc is not None:
            c.failed += 1
            if message.outcome == "retried":
                c.retried += 1
            else:
                c.dead += 1

    def after_reject(self, Processing message, reason):
        cdef _Acc c = self._of(message.queue, message.handler)
        c.dead += 1

    @property
    def pending(self):
        """Whether anything was counted since the last take."""
        return bool(self._counts)

    def take(self):
        """Everything counted since the last take, one tuple of ``wire.Counts``'s fields per
        (queue, handler); the counts restart from zero."""
        cdef _Acc c
        out = [c.counts(self.n_handler, self.n_latency) for c in self._counts.values()]
        out += [c.counts(self.n_handler, self.n_latency) for c in self._others.values()]
        self._counts, self._others = {}, {}
        return out
