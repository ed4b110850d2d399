"""Prometheus ``/metrics`` of one supervisor: what its host's workers did, and how it runs them.

The supervisor sees every completion on its host, so it is the one place that counts: no
multiprocess-directory tricks. What the handlers did is counted in the workers, on the middleware
hooks (``fastq.tally``), and arrives with the completions as ``Report.TALLY`` frames; this module
adds them up (``Metrics.tally``). How the supervisor runs them (in flight, prefetch, concurrency,
autosize decisions, worker restarts, resident memory, ring occupancy, the broker's queue depths)
is read from the engine's own statistics once a second (``Metrics.run``), the depths every
``DEPTH_EVERY`` seconds at most. A scrape reads a snapshot under a lock, in prometheus_client's
server thread; it never waits for the loop.

prometheus_client is the metrics extra (``pip install 'fastq-engine[metrics]'``) and this is its
only importer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fastq import wire
from fastq.autosize.topology import resident_bytes_of
from fastq.config import metrics_address
from fastq.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

logger = logging.getLogger(__name__)

__all__ = ["DEPTH_EVERY", "REFRESH", "Metrics", "require"]

#: label values and the value of one sample
Samples = list[tuple[tuple[str, ...], float]]

#: seconds between two reads of the engine's statistics
REFRESH = 1.0
#: seconds between two asks of the broker for its queues' depths, at least
DEPTH_EVERY = 5.0
#: the outcomes of ``fastq_messages_total``, in the order of ``wire.Counts``' fields
OUTCOMES = ("processed", "failed", "retried", "dead")


def require(address: str) -> Any:
    """The prometheus_client module.

    Raises:
        ConfigError: it is not installed; the message names the extra that installs it.
    """
    try:
        import prometheus_client
        import prometheus_client.core  # the metric families of a custom collector
    except ImportError as e:
        raise ConfigError(
            f"metrics={address!r} (--metrics, FASTQ_METRICS, App.run(metrics=...)) needs "
            f"prometheus_client, which is not installed ({e}); install the metrics extra: "
            "pip install 'fastq-engine[metrics]'"
        ) from e
    return prometheus_client


def _cumulative(counts: list[int], bounds: tuple[float, ...]) -> list[tuple[str, float]]:
    out, total = [], 0
    for bound, n in zip((*map(str, bounds), "+Inf"), counts, strict=True):
        total += n
        out.append((bound, float(total)))
    return out


class _Histogram:
    __slots__ = ("buckets", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.buckets = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def add(self, buckets: list[int], total: float) -> None:
        if len(buckets) == len(self.buckets):  # another length: a worker of another version
            self.buckets = [a + b for a, b in zip(self.buckets, buckets, strict=True)]
            self.sum += total


class Metrics:
    """The counts and the snapshot behind one supervisor's ``/metrics``.

    Raises:
        ConfigError: ``address`` is not ``host:port``, or prometheus_client is not installed.
    """

    def __init__(self, address: str) -> None:
        self.address = address
        self.host, self.port = metrics_address(address)
        self.client = require(address)
        self.lock = threading.Lock()
        #: (queue, task, outcome) -> messages
        self.messages: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.handler: dict[tuple[str, str], _Histogram] = {}
        self.latency: dict[tuple[str, str], _Histogram] = {}
        #: worker index -> messages it finished (handled, or rejected unread)
        self.tasks_done: collections.Counter[int] = collections.Counter()
        #: (name, documentation, labels, [(label values, value)]) of each gauge and counter read
        #: from the engine (replaced whole at each refresh)
        self.snapshot: list[
            tuple[str, str, str, tuple[str, ...], list[tuple[tuple[str, ...], float]]]
        ]
        self.snapshot = []
        self.depths: list[tuple[tuple[str, ...], float]] = []
        self.registry: CollectorRegistry = self.client.CollectorRegistry()
        self.registry.register(self)
        self.server: Any = None

    # -- the supervisor's side --------------------------------------------------------------

    def start(self) -> None:
        """Serve ``/metrics`` (in prometheus_client's thread).

        Raises:
            ConfigError: the address cannot be bound (in use, not this host's).
        """
        try:
            self.server, _ = self.client.start_http_server(
                self.port, addr=self.host, registry=self.registry
            )
        except OSError as e:
            raise ConfigError(
                f"cannot serve metrics at {self.address} ({e}); give a free port with "
                "--metrics host:port"
            ) from e
        self.port = self.server.server_port
        logger.info("metrics at http://%s:%d/metrics", self.host, self.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def tally(self, worker: int, payload: bytes) -> None:
        """Add a worker's ``Report.TALLY``."""
        try:
            counts = wire.parse_tally(payload)
        except wire.ProtocolError as e:
            logger.warning("worker %d sent counts that do not parse (%s); ignored", worker, e)
            return
        with self.lock:
            for c in counts:
                key = (c.queue, c.task)
                for outcome, n in zip(
                    OUTCOMES, (c.processed, c.failed, c.retried, c.dead), strict=True
                ):
                    if n:
                        self.messages[(c.queue, c.task, outcome)] += n
                if c.processed:
                    h = self.handler.get(key) or self.handler.setdefault(
                        key, _Histogram(wire.HANDLER_BUCKETS)
                    )
                    h.add(c.handler_buckets, c.handler_sum)
                    lat = self.latency.get(key) or self.latency.setdefault(
                        key, _Histogram(wire.LATENCY_BUCKETS)
                    )
                    lat.add(c.latency_buckets, c.latency_sum)
                # rejected unread: dead that were not failures of a handler run
                rejected = c.dead - (c.failed - c.retried)
                self.tasks_done[worker] += c.processed + max(0, rejected)

    async def run(self, supervisor: Any) -> None:
        """Read the engine's statistics every REFRESH seconds, the broker's depths every
        DEPTH_EVERY, until cancelled."""
        last_depth = -DEPTH_EVERY
        while True:
            try:
                self.observe(supervisor)
                now = time.monotonic()
                if now - last_depth >= DEPTH_EVERY:
                    last_depth = now
                    await self.observe_depths(supervisor)
            except asyncio.CancelledError:
                raise
            except Exception:  # a metric never stops the supervisor
                logger.exception("reading the statistics for /metrics failed")
            await asyncio.sleep(REFRESH)

    def observe(self, supervisor: Any) -> None:
        """A snapshot of the engine's statistics (in the supervisor's loop)."""
        stats = supervisor.statistics()
        queues = sorted(stats.queues.items())
        pids = [w.pid for w in stats.workers if w.pid is not None]
        rss = resident_bytes_of(pids)
        rings: Samples = []
        for m in supervisor.fleet:
            for name, ring in (("input", m.inbox), ("output", m.outbox)):
                if ring is not None and not ring.closed:
                    rings.append(((str(m.index), name), float(ring.statistics().used_bytes)))
        snapshot: list[tuple[str, str, str, tuple[str, ...], Samples]] = [
            ("fastq_messages_in_flight", "gauge", "Messages given to workers and not settled.",
             ("queue",), [((q, ), float(s.in_flight)) for q, s in queues]),
            ("fastq_prefetch", "gauge", "Unacked messages the broker may hand this host.",
             ("queue",), [((q, ), float(s.prefetch)) for q, s in queues]),
            ("fastq_concurrency", "gauge", "Handlers that may run at once on this host.",
             ("queue",), [((q, ), float(s.concurrency)) for q, s in queues]),
            ("fastq_autosize_decisions", "counter", "Changes the autosize controller made.",
             ("queue", "rule"),
             [(k, float(n)) for k, n in sorted(supervisor.tuning.rules.items())]),
            ("fastq_worker_restarts", "counter", "Worker processes started again, by cause.",
             ("worker", "cause"),
             [((str(i), c), float(n)) for (i, c), n in sorted(supervisor.restarts.items())]),
            ("fastq_worker_resident_memory_bytes", "gauge", "Resident set size of a worker.",
             ("worker",),
             [((str(w.index),), float(rss[w.pid])) for w in stats.workers if w.pid in rss]),
            ("fastq_worker_ring_used_bytes", "gauge", "Bytes waiting in a worker's ring.",
             ("worker", "ring"), rings),
        ]  # fmt: skip
        with self.lock:
            self.snapshot = snapshot

    async def observe_depths(self, supervisor: Any) -> None:
        depths: Samples = []
        for q in supervisor.queues:
            try:
                d = await supervisor.broker.queue_depth(q)
            except Exception as e:  # noqa: BLE001 - the broker is away: the last depths stay
                logger.debug("queue depth of %r not read: %s", q, e)
                return
            for state in ("ready", "unacked", "delayed", "dead"):
                depths.append(((q, state), float(getattr(d, state))))
        with self.lock:
            self.depths = depths

    # -- prometheus_client's side (its server thread) ---------------------------------------

    def collect(self) -> Iterator[Any]:
        core = self.client.core
        with self.lock:
            messages = sorted(self.messages.items())
            handler = sorted((k, list(h.buckets), h.sum) for k, h in self.handler.items())
            latency = sorted((k, list(h.buckets), h.sum) for k, h in self.latency.items())
            done = sorted(self.tasks_done.items())
            snapshot, depths = self.snapshot, self.depths
        family = core.CounterMetricFamily(
            "fastq_messages",
            "Messages by outcome: processed (every handler run that finished), failed (those "
            "that raised), retried and dead (what became of a failure; dead also counts "
            "messages rejected before a handler).",
            labels=("queue", "task", "outcome"),
        )
        for labels, n in messages:
            family.add_metric(labels, n)
        yield family
        for name, doc, bounds, rows in (
            ("fastq_handler_seconds", "Handler duration (with its middleware).",
             wire.HANDLER_BUCKETS, handler),
            ("fastq_enqueue_to_start_seconds", "From send() to the handler's start.",
             wire.LATENCY_BUCKETS, latency),
        ):  # fmt: skip
            hist = core.HistogramMetricFamily(name, doc, labels=("queue", "task"))
            for key, buckets, total in rows:
                hist.add_metric(key, _cumulative(buckets, bounds), total)
            yield hist
        tasks = core.CounterMetricFamily(
            "fastq_worker_tasks", "Messages a worker finished.", labels=("worker",)
        )
        for index, n in done:
            tasks.add_metric((str(index),), n)
        yield tasks
        for name, kind, doc, label_names, values in snapshot:
            cls = core.CounterMetricFamily if kind == "counter" else core.GaugeMetricFamily
            fam = cls(name, doc, labels=label_names)
            for sample, value in values:
                fam.add_metric(sample, value)
            yield fam
        depth = core.GaugeMetricFamily(
            "fastq_broker_messages",
            f"Messages of a queue at the broker, by state (read every {DEPTH_EVERY:g} s).",
            labels=("queue", "state"),
        )
        for sample, value in depths:
            depth.add_metric(sample, value)
        yield depth
