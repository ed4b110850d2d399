"""What a workflow run is made of, as a broker stores it, and the storage a run needs.

A run has rows: one per step (``index`` -1), one per element of a fanned-out step (``index``
0..n-1), its context (key -> msgpack) and its counters (a step's parents still to end, a
fanned-out step's elements still to end, the run's steps still to end). ``RunTx`` is what the
state machine (``fastq.workflow.run``) reads and writes, inside one transaction of the broker's
own store; ``MemoryRuns`` is the in-process one (memory:// and the unit tests).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol, TypeVar

import msgspec

T = TypeVar("T")

#: the header of a step's message: ``run_id/step/index``; the supervisor records its outcome
RUN_HEADER = "fastq-run"

#: a step's states; the first two are open, the last three ended
PENDING, RUNNING, DONE, FAILED, SKIPPED = "pending", "running", "done", "failed", "skipped"
OPEN = (PENDING, RUNNING)
#: a run's states
RUN_RUNNING, RUN_DONE, RUN_FAILED = "running", "done", "failed"


class StepRef(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Which step of which run a delivery is, and how many times its handler ran."""

    run_id: str
    step: str
    index: int
    attempts: int = 1


def ref_of(headers: dict[str, str] | None, attempts: int) -> StepRef | None:
    """The step a message with ``headers`` is (None: no step)."""
    if not headers or RUN_HEADER not in headers:
        return None
    try:
        run_id, step, index = headers[RUN_HEADER].rsplit("/", 2)
        return StepRef(run_id, step, int(index), attempts)
    except ValueError:  # not one of ours: an ordinary message
        return None


class StepSpec(msgspec.Struct, array_like=True, frozen=True):
    """One step as a run stores it: what to enqueue and when."""

    name: str
    #: the task that runs it, and its queue
    task: str
    queue: str
    parents: tuple[str, ...]
    #: the parents whose results it takes, in parameter order
    params: tuple[str, ...]
    fan_out: bool = False
    trigger: str = "all_success"


class Graph(msgspec.Struct, array_like=True, frozen=True):
    """A workflow's steps, in definition order (parents first)."""

    steps: tuple[StepSpec, ...]

    def spec(self, name: str) -> StepSpec:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def children(self, name: str) -> list[StepSpec]:
        return [s for s in self.steps if name in s.parents]


class RunRow(msgspec.Struct, frozen=True):
    run_id: str
    workflow: str
    #: a ``Graph``, msgpack
    graph: bytes
    #: the start arguments (a msgpack array): what root steps take
    args: bytes
    state: str
    created_at: float
    finished_at: float = 0.0


class StepRow(msgspec.Struct):
    """One step (``index`` -1) or one element of a fanned-out step, as stored."""

    run_id: str
    step: str
    index: int
    state: str = PENDING
    attempts: int = 0
    #: when it was enqueued, when its handler started and ended (wall clock; 0: not yet)
    queued_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    #: its return value, msgpack (a fanned-out step's: the list of its elements' values)
    result: bytes | None = None
    error: str = ""
    message_id: str = ""


class RunTx(Protocol):
    """A run's storage inside one transaction (the broker's); every write is part of it."""

    async def run(self, run_id: str) -> RunRow | None: ...

    async def put_run(self, row: RunRow) -> None: ...

    async def runs(self, workflow: str | None, state: str | None, limit: int) -> list[RunRow]: ...

    async def step(self, run_id: str, step: str, index: int) -> StepRow | None: ...

    async def steps(self, run_id: str, step: str | None = None) -> list[StepRow]:
        """Rows of the run (of ``step`` only: its elements, index >= 0), by step then index."""
        ...

    async def put_step(self, row: StepRow) -> None: ...

    async def drop_elements(self, run_id: str, step: str) -> None: ...

    async def delete_run(self, run_id: str) -> None:
        """The run and every row of it (steps, counters, context) go."""
        ...

    async def expire(self, workflow: str, before: float, limit: int) -> list[str]:
        """Delete at most ``limit`` runs of ``workflow`` that ended (done or failed) before
        ``before`` (wall clock), the oldest first, with every row of them; their ids. A run
        that is running (resumed meanwhile, say) is never one of them."""
        ...

    async def add(self, run_id: str, counter: str, delta: int) -> int:
        """Add ``delta`` to a counter (created at 0); its new value."""
        ...

    async def set(self, run_id: str, counter: str, value: int) -> None: ...

    async def context(self, run_id: str) -> dict[str, bytes]: ...

    async def set_context(self, run_id: str, items: dict[str, bytes]) -> None: ...

    async def enqueue(
        self, queue: str, message_id: str, body: bytes, headers: dict[str, str]
    ) -> None:
        """Publish a step's message in this transaction."""
        ...


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """The value of a coroutine that never suspends (the state machine over a synchronous
    store's RunTx), run here and now, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value  # type: ignore[no-any-return]
    coro.close()
    raise RuntimeError("a RunTx over a synchronous store suspended; it must not await anything")


class MemoryRuns:
    """Run state in dicts: a ``RunTx`` whose transaction is the caller's lock (its coroutines
    never suspend: ``drive`` them). Rows and counters are kept by run, so that what a run
    reads or deletes costs the same however many runs are kept."""

    def __init__(self, enqueue: Callable[[str, str, bytes, dict[str, str]], None]) -> None:
        self._enqueue = enqueue
        self.run_rows: dict[str, RunRow] = {}
        #: run id -> (step, index) -> row
        self.step_rows: dict[str, dict[tuple[str, int], StepRow]] = {}
        self.counters: dict[tuple[str, str], int] = {}
        #: run id -> the names of its counters
        self._counter_names: dict[str, set[str]] = {}
        self.contexts: dict[str, dict[str, bytes]] = {}

    async def run(self, run_id: str) -> RunRow | None:
        return self.run_rows.get(run_id)

    async def put_run(self, row: RunRow) -> None:
        self.run_rows[row.run_id] = row

    async def runs(self, workflow: str | None, state: str | None, limit: int) -> list[RunRow]:
        rows = [
            r
            for r in self.run_rows.values()
            if (workflow is None or r.workflow == workflow) and (state is None or r.state == state)
        ]
        return sorted(rows, key=lambda r: r.created_at, reverse=True)[:limit]

    async def step(self, run_id: str, step: str, index: int) -> StepRow | None:
        row = self.step_rows.get(run_id, {}).get((step, index))
        return None if row is None else msgspec.structs.replace(row)

    async def steps(self, run_id: str, step: str | None = None) -> list[StepRow]:
        rows = [
            msgspec.structs.replace(r)
            for (name, index), r in self.step_rows.get(run_id, {}).items()
            if step is None or (name == step and index >= 0)
        ]
        return sorted(rows, key=lambda r: (r.step, r.index))

    async def put_step(self, row: StepRow) -> None:
        own = self.step_rows.setdefault(row.run_id, {})
        own[(row.step, row.index)] = msgspec.structs.replace(row)

    async def drop_elements(self, run_id: str, step: str) -> None:
        own = self.step_rows.get(run_id, {})
        for key in [k for k in own if k[0] == step and k[1] >= 0]:
            del own[key]

    async def expire(self, workflow: str, before: float, limit: int) -> list[str]:
        # every kept run looked at: at most once a minute per workflow, in process
        rows = [
            r
            for r in self.run_rows.values()
            if r.workflow == workflow and r.state != RUN_RUNNING and 0 < r.finished_at < before
        ]
        ids = [r.run_id for r in sorted(rows, key=lambda r: r.finished_at)[:limit]]
        for run_id in ids:
            await self.delete_run(run_id)
        return ids

    async def delete_run(self, run_id: str) -> None:
        self.run_rows.pop(run_id, None)
        self.contexts.pop(run_id, None)
        self.step_rows.pop(run_id, None)
        for name in self._counter_names.pop(run_id, ()):
            self.counters.pop((run_id, name), None)

    async def add(self, run_id: str, counter: str, delta: int) -> int:
        value = self.counters.get((run_id, counter), 0) + delta
        await self.set(run_id, counter, value)
        return value

    async def set(self, run_id: str, counter: str, value: int) -> None:
        key = (run_id, counter)
        if key not in self.counters:
            self._counter_names.setdefault(run_id, set()).add(counter)
        self.counters[key] = value

    async def context(self, run_id: str) -> dict[str, bytes]:
        return dict(self.contexts.get(run_id, {}))

    async def set_context(self, run_id: str, items: dict[str, bytes]) -> None:
        self.contexts.setdefault(run_id, {}).update(items)

    async def enqueue(
        self, queue: str, message_id: str, body: bytes, headers: dict[str, str]
    ) -> None:
        self._enqueue(queue, message_id, body, headers)
