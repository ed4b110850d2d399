"""What becomes of each batch of ``fastq.Pool``'s calls, on the driver thread: cut from its job,
sent to the least busy worker (suspects alone, as the fleet places them), answered, or lost with
its worker and sent again by the pool's rule for deaths (``DEATHS``; the driver's docstring).
"""

from __future__ import annotations

import collections
import itertools
from typing import Any

from fastq import codec, wire
from fastq.engine.fleet import DeathPolicy, Exit, Fate, Fleet, Member
from fastq.errors import ConfigError, WorkerLost
from fastq.pool.job import DEPTH, DONE, Batch, Job

#: the pool knows what ran when a worker died (a plain function's batches run one at a time),
#: so every death counts; a batch runs alone from its second death, and the third gives up
DEATHS = DeathPolicy(alone_from=2, counts_every_death=True)


class Batches:
    """The jobs in flight and their batches (see the module docstring)."""

    def __init__(self, fleet: Fleet, ring_bytes: int) -> None:
        self.fleet, self.dispatcher, self.ring_bytes = fleet, fleet.dispatcher, ring_bytes
        self.batches: dict[int, Batch] = {}
        #: suspect batches waiting to run alone, by the tag each will be sent with
        self.suspects: dict[int, Batch] = {}
        self.tags = itertools.count(1)
        #: per function (its pickle): the seconds per item and batch size its last call
        #: reached, where the next call of it starts
        self.known: dict[bytes, tuple[float, int]] = {}
        #: totals since the pool started (Pool.statistics)
        self.counts = collections.Counter[str]()
        self.jobs: collections.deque[Job] = collections.deque()  # jobs with items to send
        self.live: set[Job] = set()

    def admit(self, job: Job) -> None:
        """A new call: it starts where the last call of its function left its batch size."""
        if job.fixed is None and not job.is_async and job.fn_ref in self.known:
            job.cost, job.size = self.known[job.fn_ref]
        self.live.add(job)
        self.jobs.append(job)

    def completions(self, m: Member, frames: list[bytes]) -> None:
        ok, other = self.dispatcher.complete(m.index, frames)
        for tag in ok:  # a pool worker never reports a bare OK
            raise RuntimeError(f"pool worker {m.index} completed batch {tag} without a reply")
        for tag, status, _, payload in other:
            if tag == 0:
                if status == wire.Report.READY:
                    self.fleet.became_ready(m)
                continue
            batch = self.batches.pop(tag)
            job = batch.job
            job.outstanding -= len(batch.items)
            job.reply_bytes_per_item = max(
                job.reply_bytes_per_item, len(payload) / len(batch.items)
            )
            self.counts["items_done"] += len(batch.items)
            if job.cancelled:
                pass
            elif status == wire.Status.RESULT:
                seconds, values, errors = codec.decode_reply(payload)
                if job.measured(batch, seconds):
                    self.known[job.fn_ref] = (job.cost or 0.0, job.size)
                if errors and errors[0][0] == codec.WHOLE_BATCH:
                    values = [None] * len(batch.items)
                    errors = [(i, errors[0][1]) for i in range(len(batch.items))]
                self.deliver(job, batch.start, values, errors)
            else:  # the runtime failed on the batch (a bug of ours): its items fail with that
                e = RuntimeError(
                    f"fastq pool worker {m.index} failed on a batch: "
                    f"{payload.decode('utf-8', 'replace')}"
                )
                self.deliver(
                    job,
                    batch.start,
                    [None] * len(batch.items),
                    [(i, e) for i in range(len(batch.items))],
                )
            self.maybe_finish(job)
        self.fleet.passed(m)

    def deliver(
        self, job: Job, start: int, values: list[Any], errors: list[tuple[int, BaseException]]
    ) -> None:
        if errors:  # the caller gets this exception: send no more of the job
            job.source = None
        job.deliver((start, values, errors))

    def maybe_finish(self, job: Job) -> None:
        if job.cancelled:
            job.source = None
            job.again.clear()
        if (
            not job.finished
            and job.source is None
            and not job.again
            and not job.alone
            and job.outstanding == 0
        ):
            job.finished = True
            self.live.discard(job)
            job.deliver(DONE)

    def pick(self, depth: int) -> Member | None:
        """The worker with the fewest batches, under ``depth``. One still starting counts: its
        ring holds the batches until it is up (so that a call made as the pool starts spreads
        over every worker), and if it never comes up they go to another, as nothing it ran. A
        worker running a suspect, or kept free for one, takes nothing else."""
        best, load = None, depth
        for m in self.fleet:
            if m.inbox is not None and m.solo is None and m.index != self.fleet.reserved:
                n = self.dispatcher.in_flight(m.index)
                if n < load:
                    best, load = m, n
        return best

    def refill(self) -> bool:
        """Send batches while some worker has room, the jobs taking turns; suspects first, each
        alone on an idle worker."""
        before = self.counts["batches"]
        if self.fleet.suspects or self.fleet.reserved is not None:
            self.drop_cancelled_suspects()
            self.fleet.place_suspects(lambda tag, index: True, self.send_suspect)
        moved = self.counts["batches"] != before
        idle = 0  # jobs in a row that could send nothing
        while self.jobs and idle < len(self.jobs):
            job = self.jobs[0]
            if job.cancelled or (job.source is None and not job.again):
                self.jobs.popleft()
                self.maybe_finish(job)
                continue
            m = self.pick(job.depth)
            if m is None:  # every worker holds this job's depth; another job's may be deeper
                self.jobs.rotate(-1)
                idle += 1
                continue
            if job.again:
                batch = job.again.popleft()
            else:
                try:
                    items = job.take(self.max_batch_bytes)
                except Exception as e:  # noqa: BLE001 - the caller's iterable raised: its call fails
                    job.source = job.seq = None
                    self.deliver(job, job.taken, [None], [(0, e)])
                    continue
                if not items:
                    continue  # the source just ran out: the check above finishes the job
                batch = Batch(job, job.taken, items)
                job.taken += len(items)
            tag = self.send(m, batch)
            if tag is None:
                job.again.appendleft(batch)
                idle += 1
            else:
                moved, idle = True, 0
            self.jobs.rotate(-1)  # the next job's turn: calls share the workers
        return moved

    @property
    def max_batch_bytes(self) -> int:
        return self.ring_bytes // (DEPTH + 1)

    def send_suspect(self, m: Member, tag: int) -> bool | None:
        """Send the suspect batch of ``tag`` to ``m`` (the fleet chose it: idle, alone): True
        when sent, False when its ring has no room now, None when it failed without running."""
        batch = self.suspects[tag]
        sent = self.send(m, batch, tag)
        if sent is None:
            return False
        del self.suspects[tag]
        batch.job.alone -= 1
        if not sent:
            self.maybe_finish(batch.job)
            return None
        return True

    def drop_cancelled_suspects(self) -> None:
        for tag in [t for t in self.fleet.suspects if self.suspects[t].job.cancelled]:
            self.fleet.suspects.remove(tag)
            job = self.suspects.pop(tag).job
            job.alone -= 1
            self.maybe_finish(job)

    def send(self, m: Member, batch: Batch, tag: int | None = None) -> int | None:
        """Write the batch to ``m``: its tag, 0 when it was handled without sending (an error,
        a split), None when the ring has no room now."""
        job = batch.job
        try:
            body = codec.encode_request(job.fn_ref, job.flags, batch.items)
        except TypeError as e:
            self.deliver(
                job,
                batch.start,
                [None] * len(batch.items),
                [(i, e) for i in range(len(batch.items))],
            )
            return 0
        job.bytes_per_item = len(body) / len(batch.items)
        assert m.inbox is not None
        if len(body) + 64 > m.inbox.max_frame_bytes:
            if len(batch.items) > 1:
                half = len(batch.items) // 2
                job.again.extendleft(
                    [
                        Batch(job, batch.start + half, batch.items[half:], batch.deaths),
                        Batch(job, batch.start, batch.items[:half], batch.deaths),
                    ]
                )
            else:
                big = ConfigError(
                    f"an argument of {len(body)} bytes (encoded) does not fit the pool's "
                    f"rings of {self.ring_bytes} bytes; make the Pool with ring_bytes= "
                    f"above {2 * len(body)}"
                )
                self.deliver(job, batch.start, [None], [(0, big)])
            return 0
        tag = tag or next(self.tags)
        if self.dispatcher.dispatch_to(m.index, [(tag, 0, 0, body)]):
            return None
        self.batches[tag] = batch
        job.outstanding += len(batch.items)
        self.counts["batches"] += 1
        self.counts["items_sent"] += len(batch.items)
        return tag

    def lost(self, gone: Exit, reason: str) -> None:
        """What the worker of ``gone`` held: what ran takes a death by the pool's rule, what
        waited in its ring goes again as it was."""
        m = gone.member
        # What ran when the worker died: a plain function's batches run one after the other,
        # so the oldest it held; an async (or threaded) job's batches run together, so all of
        # them. The rest waited in its ring: they go again as they were.
        running = {t for t in gone.lost if self.batches[t].job.is_async}
        plain = [t for t in gone.lost if t not in running]
        if plain:
            running.add(plain[0])
        for tag in gone.lost:
            batch = self.batches.pop(tag)
            job = batch.job
            job.outstanding -= len(batch.items)
            if job.cancelled:
                self.maybe_finish(job)
                continue
            if gone.before_ready or gone.stopped or tag not in running:  # not the items' fault
                job.again.append(batch)
            elif not self.died_with(
                batch, alone=gone.solo == tag, m=m, pid=gone.pid, reason=reason
            ):
                continue
            self.counts["items_again"] += len(batch.items)
            if job not in self.jobs:
                self.jobs.append(job)
        # the batches to run again go in order of their items
        for job in self.jobs:
            if len(job.again) > 1:
                job.again = collections.deque(sorted(job.again, key=lambda b: b.start))

    def died_with(
        self, batch: Batch, *, alone: bool, m: Member, pid: int | None, reason: str
    ) -> bool:
        """``batch`` was running when its worker died: what it becomes by the pool's rule.
        False when it is given up (its item fails with WorkerLost)."""
        job = batch.job
        deaths, fate = DEATHS.after_death(batch.deaths, alone)
        if fate is Fate.GIVE_UP:
            e = WorkerLost(
                f"pool worker {m.index} (pid {pid}) died ({reason}) while running this "
                f"call alone, after two workers died running it with others; the function "
                f"may end its process (os._exit, a crash in C code, the out-of-memory killer)"
            )
            self.deliver(job, batch.start, [None], [(0, e)])
            self.maybe_finish(job)
            return False
        if fate is Fate.AGAIN:
            job.again.append(Batch(job, batch.start, batch.items, deaths))
            return True
        for i, x in enumerate(batch.items):  # one by one, each alone on a worker
            tag = next(self.tags)
            self.suspects[tag] = Batch(job, batch.start + i, [x], deaths)
            self.fleet.suspects.append(tag)
        job.alone += len(batch.items)
        return True
