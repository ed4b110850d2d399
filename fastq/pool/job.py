"""One call of ``fastq.Pool`` and the batches it is cut into, sized from what they cost.

The first batch of a call holds one item; later ones aim at ``BATCH_SECONDS`` of worker time (by
the per-item time the workers report), within ``MAX_BATCH_ITEMS`` and a share of the ring, and
near the end of a call of known length at a share of what is left per worker, so that the last
batches end together. A worker holds at most ``DEPTH`` batches, so the last items of a call
spread over every worker instead of queueing behind one.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import pickle
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastq import codec
from fastq.autosize import IO_CONCURRENCY_MAX

#: worker seconds a batch aims at once its items' cost is known: long enough that the caller's
#: share per batch (about 50 us of its CPU, taken from the workers' cores) is lost in it
BATCH_SECONDS = 0.02
#: and at most this share of what is left of a call per worker, when its length is known, so
#: that the last batches are short and end together on every worker; but not below this many
#: seconds of work, where round trips would cost more than the uneven end
TAIL_SHARE = 1 / 4
TAIL_SECONDS = 0.001
MAX_BATCH_ITEMS = 16384
#: a batch holds at most this many times the items of the largest batch measured so far: a
#: first item cheaper than the rest cannot make one worker take most of a call
GROWTH = 8
#: batches a worker holds at most: one running, the next ones waiting in its ring
DEPTH = 3
#: async calls in flight per worker, by default: the formula's high-concurrency tier (a pool
#: holds no broker prefetch; its caller already has every item)
ASYNC_CONCURRENCY = IO_CONCURRENCY_MAX
RING_BYTES = 8 << 20
#: a worker that exits this often in a row before it is ready breaks the pool
START_FAILURES = 3
#: delivered after a call's last results
DONE = object()


class Job:
    """One call of map, imap, imap_unordered, submit or their async forms."""

    def __init__(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        star: bool,
        batch_size: int | None,
        concurrency: int,
        deliver: Callable[[Any], None],
        length: int = 0,
        processes: int = 1,
        threads: bool = False,
    ) -> None:
        try:
            self.fn_ref = pickle.dumps(fn, 5)
        except Exception as e:
            raise TypeError(
                f"fn {fn!r} cannot be sent to the pool's workers ({e}); define it at module "
                f"level (a def, or functools.partial of one), as multiprocessing needs too"
            ) from e
        coroutine = inspect.iscoroutinefunction(fn)
        #: its calls overlap in a worker (coroutines, or a plain function on threads: kind="io"),
        #: so it is sized by concurrency, not by measured cost
        self.is_async = coroutine or threads
        self.flags = (codec.STAR if star else 0) | (
            codec.THREADS if threads and not coroutine else 0
        )
        self.source: Iterator[Any] | None = iter(items)
        self.seq: list[Any] | tuple[Any, ...] | None = (
            items if isinstance(items, (list, tuple)) else None
        )
        self.taken = 0  # items taken from the source
        self.length, self.processes = length, processes  # length: 0 when unknown
        self.outstanding = 0  # items sent whose results are not in
        self.again: collections.deque[Batch] = collections.deque()  # to send again, first
        self.alone = 0  # its suspect batches waiting to run alone on a worker
        self.fixed = batch_size
        if self.is_async:  # enough in flight that every worker's concurrency stays busy
            self.size = batch_size or max(1, concurrency // 4)
            self.depth = max(DEPTH, -(-2 * concurrency // self.size))
        else:
            self.size, self.depth = batch_size or 1, DEPTH
        self.cost: float | None = None  # worker seconds per item
        self.bytes_per_item = 0.0  # of the last request sent, and of the largest reply seen
        self.reply_bytes_per_item = 0.0
        self.deliver = deliver  # (start, values, errors) | DONE, called on the driver thread
        self.cancelled = False
        self.finished = False

    def take(self, max_bytes: int) -> list[Any]:
        """The next items to send, sized from their measured cost."""
        assert self.source is not None
        n = self.size
        if self.fixed is None and self.cost is not None and not self.is_async:
            n = int(
                min(
                    MAX_BATCH_ITEMS,
                    max(1, BATCH_SECONDS / max(self.cost, 1e-9)),
                    GROWTH * self.size,
                )
            )
            if self.length > self.taken:
                tail = max(
                    (self.length - self.taken) / self.processes * TAIL_SHARE,
                    TAIL_SECONDS / max(self.cost, 1e-9),
                )
                n = max(1, min(n, int(tail)))
        per_item = max(self.bytes_per_item, self.reply_bytes_per_item)
        if per_item:
            n = max(1, min(n, int(max_bytes / per_item)))
        if self.seq is not None:  # a list or tuple: slice it (a copy of pointers, no iteration)
            items = list(self.seq[self.taken : self.taken + n])
        else:
            items = list(itertools.islice(self.source, n))
        if len(items) < n:
            self.source = self.seq = None
        return items

    def measured(self, batch: Batch, seconds: float) -> bool:
        """Learn the per-item cost from a batch's worker time; False when sizes are not learnt."""
        if self.is_async or self.fixed is not None:
            return False
        per = seconds / len(batch.items)
        self.cost = per if self.cost is None else 0.5 * (self.cost + per)
        self.size = max(self.size, len(batch.items))
        return True


class Batch:
    """Some items of one call, sent to one worker as one frame."""

    __slots__ = ("deaths", "items", "job", "start")

    def __init__(self, job: Job, start: int, items: list[Any], deaths: int = 0) -> None:
        #: workers that died while it ran (fastq.engine.fleet.DeathPolicy, the pool's DEATHS):
        #: 1, it runs again whole; 2, its items run one by one and alone on their worker (a
        #: suspect); a suspect that loses its worker is WorkerLost
        self.job, self.start, self.items, self.deaths = job, start, items, deaths


class Failure:
    """Delivered instead of results when the pool itself fails (terminated, broken)."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error
