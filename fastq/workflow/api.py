"""Starting, reading and resuming a workflow's runs: the methods ``Workflow`` inherits, and the
status values they return. Run state is written by the broker (``Broker.run_transaction``), in
one transaction each."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from fastq import message
from fastq.broker.base import Broker, Output
from fastq.errors import ConfigError, WorkflowFailed
from fastq.workflow import run
from fastq.workflow.context import StepRun
from fastq.workflow.relay import relay_of
from fastq.workflow.state import (
    FAILED,
    RUN_DONE,
    RUN_FAILED,
    RUN_RUNNING,
    SKIPPED,
    Graph,
    RunRow,
    RunTx,
    StepRow,
)

if TYPE_CHECKING:
    from fastq.app import App
    from fastq.workflow.graph import Step

T = TypeVar("T")
logger = logging.getLogger(__name__)

#: seconds between looks at a run that ``result`` waits for: FIRST_LOOK, doubling up to POLL
#: (a short run is seen ending within milliseconds; a long wait reads at most 20 times a second)
FIRST_LOOK, POLL = 0.001, 0.05
#: at most every this many seconds (or ``keep``, if shorter) a start has the runs that ended
#: over ``keep`` ago deleted, off its thread, ``EXPIRE_BATCH`` to a transaction until none is left
EXPIRE_EVERY, EXPIRE_BATCH = 60.0, 200
_args = msgspec.msgpack.Decoder(list[msgspec.Raw])
_encoder = msgspec.msgpack.Encoder()


class StepStatus(msgspec.Struct, frozen=True):
    """One step of a run (or one element of a fanned-out step): ``state`` is pending (waiting
    for its parents), running (enqueued or being handled), done, failed or skipped; times are
    wall-clock seconds (0: not yet); ``attempts`` counts its handler's runs, known once it
    ended."""

    name: str
    index: int
    state: str
    attempts: int
    queued_at: float
    started_at: float
    finished_at: float
    error: str
    #: the elements of a fanned-out step, in order
    elements: list[StepStatus] = []


class RunStatus(msgspec.Struct, frozen=True):
    run_id: str
    workflow: str
    #: running, done or failed
    state: str
    created_at: float
    finished_at: float
    #: by name, in definition order
    steps: dict[str, StepStatus]
    #: the run's context (``fastq.RunContext``), as stored
    context: dict[str, Any]

    @property
    def failed(self) -> dict[str, str]:
        """Failed steps and why."""
        return {n: s.error for n, s in self.steps.items() if s.state == FAILED}

    @property
    def skipped(self) -> list[str]:
        return [n for n, s in self.steps.items() if s.state == SKIPPED]


def _status(row: StepRow, elements: list[StepStatus]) -> StepStatus:
    return StepStatus(
        row.step,
        row.index,
        row.state,
        row.attempts,
        row.queued_at,
        row.started_at,
        row.finished_at,
        row.error,
        elements,
    )


def run_status(run_row: RunRow, rows: list[StepRow], context: dict[str, bytes]) -> RunStatus:
    graph = run.graph_of(run_row.graph)
    by_step: dict[str, list[StepRow]] = {}
    for r in rows:
        by_step.setdefault(r.step, []).append(r)
    steps = {}
    for spec in graph.steps:
        own = by_step.get(spec.name, [])
        head = next((r for r in own if r.index < 0), StepRow(run_row.run_id, spec.name, -1))
        elements = [_status(r, []) for r in own if r.index >= 0]
        steps[spec.name] = _status(head, elements)
    ctx = {k: msgspec.msgpack.decode(v) for k, v in context.items()}
    return RunStatus(
        run_row.run_id,
        run_row.workflow,
        run_row.state,
        run_row.created_at,
        run_row.finished_at,
        steps,
        ctx,
    )


def store_of(app: App) -> Broker:
    """Where ``app``'s runs live: its broker, or (a broker that keeps none: RabbitMQ) its
    result store.

    Raises:
        ConfigError: neither keeps runs (the message says what to configure).
    """
    broker = app.broker
    if broker.keeps_runs:
        return broker
    if app.result_store_url is None:
        raise ConfigError(
            f"{broker.url} keeps no workflow runs; give the App a result store that keeps them: "
            "App(..., result_store='sqlite:///runs.db')"
        )
    store = app.result_store
    if not store.keeps_runs_for_others:
        raise ConfigError(
            f"result_store={store.url} keeps no workflow runs for {broker.url}; give a "
            "sqlite:/// or postgresql:// result store"
        )
    return store


def transaction(app: App, work: Callable[[RunTx], Coroutine[Any, Any, T]], write: bool) -> T:
    """``work`` in one transaction where ``app``'s runs live; what it enqueued there for
    another broker (the store's outbox) is handed to the app's relay, which publishes it to
    that broker and then lets it go (``fastq.workflow.relay``): the caller does not wait."""
    store = store_of(app)
    if store is app.broker or not write:
        return store.run_transaction(work, write=write)
    made: list[tuple[int, Output]] = []
    out = store.run_transaction(work, outbox=made)
    if made:
        relay_of(app, store).submit(made)
    return out


def list_runs(
    app: App, workflow: str | None = None, state: str | None = None, limit: int = 100
) -> list[RunRow]:
    """Runs, newest first (of ``workflow``, in ``state``)."""
    return transaction(app, lambda tx: tx.runs(workflow, state, limit), write=False)


def read_status(app: App, run_id: str) -> RunStatus | None:
    found = transaction(app, lambda tx: run.status(tx, run_id), write=False)
    return None if found is None else run_status(*found)


def read_graph(app: App, run_id: str) -> Graph | None:
    """The steps of run ``run_id`` as it was started (None: no such run)."""
    row = transaction(app, lambda tx: tx.run(run_id), write=False)
    return None if row is None else run.graph_of(row.graph)


def resume_run(app: App, run_id: str) -> list[str]:
    """Resume run ``run_id`` (see ``Workflow.resume``)."""
    try:
        return transaction(app, lambda tx: run.resume(tx, run_id, time.time()), write=True)
    except KeyError:
        raise _no_run(app, run_id) from None


def forget_run(app: App, run_id: str) -> bool:
    """Delete run ``run_id`` if it ended (see ``Workflow.forget``)."""
    return transaction(app, lambda tx: run.forget(tx, run_id), write=True)


def _no_run(app: App, run_id: str) -> ConfigError:
    return ConfigError(
        f"no run {run_id!r} in {store_of(app).url}; list the runs with `fastq runs module:app`"
    )


class RunAPI:
    """``start``, ``status``, ``result``, ``resume`` of a ``Workflow``."""

    app: App
    name: str
    steps: dict[str, Step]
    #: seconds an ended run is kept (None: until forgotten); when its runs expire next; held
    #: while a thread deletes them
    keep: float | None
    next_expiry: float
    expiring: threading.Lock

    def graph(self) -> Graph:
        raise NotImplementedError

    def roots(self) -> list[Step]:
        raise NotImplementedError

    def sinks(self) -> list[Step]:
        raise NotImplementedError

    def _encode_start(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
        """The start arguments as a msgpack array, checked against every root step's
        parameters (each root takes them all)."""
        encoded = b""
        for root in self.roots():
            m = root.task.message(StepRun("", root.name, -1), *args, **kwargs)
            raw = _args.decode(message.decode(m.body).args)[1:]
            encoded = _encoder.encode(raw)
        return encoded

    def start(self, *args: Any, **kwargs: Any) -> str:
        """Start a run: its root steps are enqueued with these arguments; its id. Where the runs
        are kept apart from the broker (RabbitMQ with a result store) it returns once the run is
        committed there: the app's relay publishes the root steps right after, from a thread
        of this process (``fastq.workflow.relay``; before this process exits, too).

        Raises:
            ConfigError: the broker keeps no runs (memory://, sqlite:// and postgresql:// do).
            TypeError, msgspec.ValidationError: the arguments do not fit a root step.
        """
        graph, raw = self.graph(), self._encode_start(args, kwargs)
        run_id = message.new_id()
        transaction(
            self.app, lambda tx: run.start(tx, run_id, self.name, graph, raw, time.time()), True
        )
        self._expire()
        return run_id

    def _expire(self) -> None:
        """If it is due, have the runs that ended more than ``keep`` seconds ago deleted by a
        thread of their own (the start does not wait for it), as many as there are."""
        now = time.monotonic()
        if self.keep is None or now < self.next_expiry or self.expiring.locked():
            return
        self.next_expiry = now + min(EXPIRE_EVERY, self.keep)
        threading.Thread(
            target=self._expire_all,
            args=(self.keep,),
            name=f"fastq-expire-{self.name}",
            daemon=True,
        ).start()

    async def _expired(self, keep: float, tx: RunTx) -> int:
        return await run.expire(tx, self.name, time.time() - keep, EXPIRE_BATCH)

    def _expire_all(self, keep: float) -> None:
        """Delete the runs ended over ``keep`` seconds ago, ``EXPIRE_BATCH`` to a transaction
        (short: a supervisor waits for SQLite's write lock meanwhile) until a batch is not
        full. A failure is logged, never raised: the next expiry that is due tries again."""
        with self.expiring:
            gone = 0
            try:
                while True:
                    n = transaction(self.app, functools.partial(self._expired, keep), True)
                    gone += n
                    if n < EXPIRE_BATCH:
                        break
            except Exception as e:  # noqa: BLE001 - housekeeping: the next due expiry tries again
                logger.warning(
                    "workflow %s: deleting runs ended over %g s ago failed: %s", self.name, keep, e
                )
            if gone:
                logger.info(
                    "workflow %s: deleted %d runs that ended over %g s ago", self.name, gone, keep
                )

    async def start_async(self, *args: Any, **kwargs: Any) -> str:
        """``start`` for coroutines (the transaction runs off the event loop)."""
        graph, raw = self.graph(), self._encode_start(args, kwargs)
        run_id = message.new_id()
        await asyncio.get_running_loop().run_in_executor(
            None,
            transaction,
            self.app,
            lambda tx: run.start(tx, run_id, self.name, graph, raw, time.time()),
            True,
        )
        self._expire()  # it only hands the deletion to a thread
        return run_id

    def status(self, run_id: str) -> RunStatus:
        """Where run ``run_id`` is: its state, each step's state, attempts, times and error.

        Raises:
            ConfigError: no such run in this App's broker.
        """
        found = read_status(self.app, run_id)
        if found is None:
            raise _no_run(self.app, run_id)
        return found

    def runs(self, state: str | None = None, limit: int = 100) -> list[RunRow]:
        """This workflow's runs, newest first (in ``state``: running, done, failed)."""
        return list_runs(self.app, self.name, state, limit)

    def result(self, run_id: str, timeout: float | None = None) -> dict[str, Any]:
        """Wait for run ``run_id`` to end; the values of its sink steps (those no step depends
        on), by name, decoded as their return annotations say. Each look reads the run's row
        alone: at once, then after ``FIRST_LOOK`` seconds, twice as long each time, up to
        ``POLL``.

        Raises:
            WorkflowFailed: a step failed (after its retries); it names them, and why.
            TimeoutError: the run did not end within ``timeout`` seconds.
            ConfigError: no such run in this App's broker.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = FIRST_LOOK
        while True:
            state = self._state(run_id)
            if state != RUN_RUNNING:
                ended = self._ended(run_id, state)
                if ended is not None:
                    return ended
            if deadline is not None and time.monotonic() >= deadline:
                raise self._timed_out(run_id, timeout)
            left = POLL if deadline is None else max(deadline - time.monotonic(), 0.0)
            time.sleep(min(pause, left))
            pause = min(pause * 2, POLL)

    async def result_async(self, run_id: str, timeout: float | None = None) -> dict[str, Any]:
        """``result`` for coroutines: each look runs off the event loop, free in between."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        pause = FIRST_LOOK
        while True:
            state = await loop.run_in_executor(None, self._state, run_id)
            if state != RUN_RUNNING:
                ended = await loop.run_in_executor(None, self._ended, run_id, state)
                if ended is not None:
                    return ended
            if deadline is not None and loop.time() >= deadline:
                raise await loop.run_in_executor(None, self._timed_out, run_id, timeout)
            left = POLL if deadline is None else max(deadline - loop.time(), 0.0)
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, POLL)

    def _state(self, run_id: str) -> str:
        """Run ``run_id``'s state (running, done, failed), from its row alone."""
        row = transaction(self.app, lambda tx: tx.run(run_id), write=False)
        if row is None:
            raise _no_run(self.app, run_id)
        return row.state

    def _timed_out(self, run_id: str, timeout: float | None) -> TimeoutError:
        st = self.status(run_id)
        running = [n for n, s in st.steps.items() if s.state not in ("done", "skipped")]
        return TimeoutError(
            f"run {run_id} of workflow {self.name} did not end within {timeout or 0:g} s; "
            f"not ended: {', '.join(running)}; wait longer, or check that a worker consumes "
            "the steps' queues"
        )

    def _ended(self, run_id: str, state: str) -> dict[str, Any] | None:
        """The sink steps' values of run ``run_id``, seen ``state`` (done or failed) a moment
        ago; WorkflowFailed if it failed; None if it changed since (resumed): look again."""
        if state == RUN_FAILED:
            st = self.status(run_id)
            if st.state == RUN_FAILED:
                raise WorkflowFailed(self.name, run_id, st.failed, st.skipped)
            return None

        async def values(tx: RunTx) -> dict[str, bytes | None] | None:
            row = await tx.run(run_id)  # in the same snapshot as the values
            if row is None:
                raise _no_run(self.app, run_id)
            if row.state != RUN_DONE:
                return None
            out = {}
            for sink in self.sinks():
                step = await tx.step(run_id, sink.name, -1)
                out[sink.name] = None if step is None else step.result
            return out

        raw = transaction(self.app, values, write=False)
        if raw is None:  # failed or running again since: the caller looks again
            return None
        return {
            name: run.decode_value(value, msgspec.msgpack.Decoder(self.steps[name].produces))
            for name, value in raw.items()
        }

    def forget(self, run_id: str) -> bool:
        """Delete run ``run_id`` and everything it holds (results, context), if it ended,
        before ``keep`` runs out. False: it is running (kept), or there is no such run."""
        return forget_run(self.app, run_id)

    def resume(self, run_id: str) -> list[str]:
        """Run again the steps of an ended run that did not end done (failed, and those skipped
        because of them); done steps keep their results and do not run again. The names of the
        steps that will run (empty: the run is still running, or every step is done).

        Raises:
            ConfigError: no such run in this App's broker.
        """
        return resume_run(self.app, run_id)
