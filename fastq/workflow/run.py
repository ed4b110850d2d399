"""A workflow run's state machine: start, a step's outcome, resume, status. Pure: it reads and
writes through a ``RunTx`` (one transaction of the broker's own store) and nothing else, so the
supervisor records a step's result and enqueues its ready children in the transaction that
acks the step's message.

Counters make fan-in exact without polling: ``wait:<step>`` is the number of its parents still
to end (kept for a step with several: one with a single parent is ready when that one ends),
``left:<step>`` the elements of a fanned-out step still to end, ``open`` the run's steps still
to end. Each is decremented in the transaction of the outcome that ends something; the one that
reaches 0 enqueues (or skips) what was waiting, so exactly once. A step has no row until it is
enqueued (or skipped): no row is pending. An outcome for a row that ended already (a step
delivered twice) changes nothing: the first completion wins.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from fastq import message, results
from fastq.workflow.state import (
    DONE,
    FAILED,
    OPEN,
    PENDING,
    RUN_DONE,
    RUN_FAILED,
    RUN_HEADER,
    RUN_RUNNING,
    RUNNING,
    SKIPPED,
    Graph,
    RunRow,
    RunTx,
    StepRef,
    StepRow,
    StepSpec,
)

__all__ = ["complete", "expire", "forget", "resume", "start", "status"]

# Every function here is a coroutine over an async RunTx: a store with a synchronous transaction
# (SQLite, memory) never suspends and drives it with ``state.drive``; PostgreSQL awaits it on
# asyncpg.

NIL = results.NIL
_encoder = msgspec.msgpack.Encoder()
_outcome = msgspec.msgpack.Decoder(results.Outcome)
_elements = msgspec.msgpack.Decoder(list[msgspec.Raw])
#: what a step's handler returns on the wire: its value, the context keys it set, when it started
_returned = msgspec.msgpack.Decoder(tuple[msgspec.Raw, dict[str, msgspec.Raw], float])


@functools.lru_cache(maxsize=64)
def graph_of(raw: bytes) -> Graph:
    return msgspec.msgpack.decode(raw, type=Graph)


def _array(items: list[bytes]) -> bytes:
    return _encoder.encode([msgspec.Raw(i) for i in items])


async def start(
    tx: RunTx, run_id: str, workflow: str, graph: Graph, args: bytes, now: float
) -> None:
    """Record a new run and enqueue its root steps (``args``: a msgpack array, their arguments)."""
    run = RunRow(run_id, workflow, _encoder.encode(graph), args, RUN_RUNNING, now)
    await tx.put_run(run)
    # a step without a row is pending (written when it is enqueued); only a step with several
    # parents needs a counter: one parent ending is what makes a lone child ready
    for spec in graph.steps:
        if len(spec.parents) > 1:
            await tx.set(run_id, "wait:" + spec.name, len(spec.parents))
    await tx.set(run_id, "open", len(graph.steps))
    for spec in graph.steps:
        if not spec.parents:
            await _ready(tx, run, graph, spec, now)


async def complete(tx: RunTx, ref: StepRef, outcome: bytes, now: float) -> bool:
    """Record what one step's handler came to (a ``results.Outcome``) and move the run on;
    False when that row had ended already (or is unknown): nothing changed."""
    row = await tx.step(ref.run_id, ref.step, ref.index)
    run = await tx.run(ref.run_id)
    if row is None or run is None or row.state not in OPEN:
        return False
    graph = graph_of(run.graph)
    try:
        spec = graph.spec(ref.step)
    except KeyError:  # a step this run was not started with (another version of the app)
        return False
    row.attempts, row.finished_at = ref.attempts, now
    try:
        o = _outcome.decode(outcome)
        row.finished_at = o.finished_at
        if o.ok:
            value, changes, started = _returned.decode(o.value)
            row.state, row.result, row.started_at = DONE, bytes(value), started
            if changes:
                await tx.set_context(ref.run_id, {k: bytes(v) for k, v in changes.items()})
        else:
            row.state = FAILED
            row.error = o.reason or f"{o.error_type}: {o.error_message}"
    except msgspec.DecodeError as e:
        row.state, row.error = FAILED, f"its outcome does not decode: {e}"
    await tx.put_step(row)
    if ref.index < 0:
        await _ended(tx, run, graph, spec, now)
    elif await tx.add(ref.run_id, "left:" + ref.step, -1) <= 0:
        await _join(tx, run, graph, spec, now)
    return True


async def _ready(tx: RunTx, run: RunRow, graph: Graph, spec: StepSpec, now: float) -> None:
    """Every parent of ``spec`` ended: enqueue it (each element, if it fans out), or skip it."""
    row = await tx.step(run.run_id, spec.name, -1)
    if row is None:  # not written before it is enqueued
        row = StepRow(run.run_id, spec.name, -1)
    elif row.state != PENDING:
        return
    parents = {p: await tx.step(run.run_id, p, -1) for p in spec.parents}
    bad = [f"{p} {r.state if r else 'unknown'}" for p, r in parents.items() if not _done(r)]
    if bad and spec.trigger == "all_success":
        row.state, row.finished_at, row.error = SKIPPED, now, "skipped: " + ", ".join(bad)
        await tx.put_step(row)
        await _ended(tx, run, graph, spec, now)
        return
    if spec.parents:
        values = [_value(parents[p]) for p in spec.params]
    else:
        values = [bytes(v) for v in _elements.decode(run.args)]
    row.state, row.queued_at = RUNNING, now
    if not spec.fan_out:
        row.message_id = await _enqueue(tx, run, spec, -1, values)
        await tx.put_step(row)
        return
    source = values[0] if values else NIL
    try:
        elements = [] if source == NIL else [bytes(v) for v in _elements.decode(source)]
    except msgspec.DecodeError as e:  # checked at definition; a value from another version
        row.state, row.finished_at, row.error = FAILED, now, f"cannot fan out: {e}"
        await tx.put_step(row)
        await _ended(tx, run, graph, spec, now)
        return
    done = {e.index for e in await tx.steps(run.run_id, spec.name) if e.state == DONE}
    todo = [i for i in range(len(elements)) if i not in done]
    await tx.put_step(row)
    await tx.set(run.run_id, "left:" + spec.name, len(todo))
    context = await _context(tx, run)  # read once: every element starts with the same one
    for i in todo:
        mid = await _enqueue(tx, run, spec, i, [elements[i]], context)
        await tx.put_step(StepRow(run.run_id, spec.name, i, RUNNING, queued_at=now, message_id=mid))
    if not todo:
        await _join(tx, run, graph, spec, now)


def _done(row: StepRow | None) -> bool:
    return row is not None and row.state == DONE


def _value(row: StepRow | None) -> bytes:
    return row.result if row is not None and row.state == DONE and row.result else NIL


async def _join(tx: RunTx, run: RunRow, graph: Graph, spec: StepSpec, now: float) -> None:
    """Every element of fanned-out ``spec`` ended: the step ends, done with the list of their
    values in element order, or failed if one failed."""
    elements = await tx.steps(run.run_id, spec.name)
    row = await tx.step(run.run_id, spec.name, -1)
    assert row is not None
    failed = [e for e in elements if e.state != DONE]
    row.attempts = max((e.attempts for e in elements), default=0)
    row.started_at = min((e.started_at for e in elements if e.started_at), default=0.0)
    row.finished_at = max((e.finished_at for e in elements), default=now)
    if failed:
        row.state = FAILED
        row.error = (
            f"{len(failed)} of {len(elements)} elements failed; "
            f"element {failed[0].index}: {failed[0].error}"
        )
    else:
        row.state, row.result = DONE, _array([e.result or NIL for e in elements])
    await tx.put_step(row)
    await _ended(tx, run, graph, spec, now)


async def _ended(tx: RunTx, run: RunRow, graph: Graph, spec: StepSpec, now: float) -> None:
    """``spec`` ended (done, failed, skipped): its children whose last parent it was are ready;
    the run ends with its last step."""
    for child in graph.children(spec.name):
        if len(child.parents) == 1 or await tx.add(run.run_id, "wait:" + child.name, -1) == 0:
            await _ready(tx, run, graph, child, now)
    if await tx.add(run.run_id, "open", -1) == 0:
        rows = [r for r in await tx.steps(run.run_id) if r.index < 0]
        state = RUN_FAILED if any(r.state == FAILED for r in rows) else RUN_DONE
        current = await tx.run(run.run_id) or run
        await tx.put_run(msgspec.structs.replace(current, state=state, finished_at=now))


async def _context(tx: RunTx, run: RunRow) -> dict[str, msgspec.Raw]:
    return {k: msgspec.Raw(v) for k, v in (await tx.context(run.run_id)).items()}


async def _enqueue(
    tx: RunTx,
    run: RunRow,
    spec: StepSpec,
    index: int,
    values: list[bytes],
    context: dict[str, msgspec.Raw] | None = None,
) -> str:
    """Publish one step's (or element's) message; its id. Its first argument tells the handler
    which run it is in and the run's context now (``context``: read already)."""
    if context is None:
        context = await _context(tx, run)
    head = _encoder.encode((run.run_id, spec.name, index, context))
    headers = {RUN_HEADER: f"{run.run_id}/{spec.name}/{index}", results.KEEP: "1"}
    message_id, body = message.encode(
        spec.task, msgspec.Raw(_array([head, *values])), headers=headers
    )
    await tx.enqueue(spec.queue, message_id, body, headers)
    return message_id


async def resume(tx: RunTx, run_id: str, now: float) -> list[str]:
    """Run the steps of an ended run that did not end done again (done ones keep their results;
    a fanned-out step keeps its done elements unless its parent runs again); the names of the
    steps that will run. Empty: nothing to do (the run is running, or every step is done).

    Raises:
        KeyError: no run has that id.
    """
    run = await tx.run(run_id)
    if run is None:
        raise KeyError(run_id)
    if run.state == RUN_RUNNING:
        return []
    graph = graph_of(run.graph)
    rows = {r.step: r for r in await tx.steps(run_id) if r.index < 0}
    again = [s for s in graph.steps if not _done(rows.get(s.name))]
    names = {s.name for s in again}
    if not again:
        return []
    for spec in again:
        await tx.put_step(StepRow(run_id, spec.name, -1))
        if spec.fan_out and spec.parents[0] in names:
            await tx.drop_elements(run_id, spec.name)
        if len(spec.parents) > 1:
            await tx.set(run_id, "wait:" + spec.name, sum(p in names for p in spec.parents))
    await tx.set(run_id, "open", len(again))
    run = msgspec.structs.replace(run, state=RUN_RUNNING, finished_at=0.0)
    await tx.put_run(run)
    ready = [s for s in again if not any(p in names for p in s.parents)]
    for spec in ready:
        await _ready(tx, run, graph, spec, now)
    return [s.name for s in again]


async def forget(tx: RunTx, run_id: str) -> bool:
    """Delete an ended run and all it holds; False when it is running (kept) or unknown."""
    run = await tx.run(run_id)
    if run is None or run.state == RUN_RUNNING:
        return False
    await tx.delete_run(run_id)
    return True


async def expire(tx: RunTx, workflow: str, before: float, limit: int) -> int:
    """Delete at most ``limit`` runs of ``workflow`` that ended before ``before`` (the oldest
    first), and all they hold; how many. A running run is never one of them."""
    return len(await tx.expire(workflow, before, limit))


async def status(tx: RunTx, run_id: str) -> tuple[RunRow, list[StepRow], dict[str, bytes]] | None:
    """The run, its rows and its context as stored (None: no such run)."""
    run = await tx.run(run_id)
    if run is None:
        return None
    return run, await tx.steps(run_id), await tx.context(run_id)


def decode_value(raw: bytes | None, decoder: msgspec.msgpack.Decoder[Any]) -> Any:
    return decoder.decode(raw if raw else NIL)
