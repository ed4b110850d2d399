"""An app's messages run in this process, through the workers' own handler path
(``fastq.executors.app.AppExecutor``: decoding, validation, middleware, retries, dead letters,
results, ``publish_to``): ``drain`` for tests, and the eager sends of ``app.testing(eager=True)``.

What differs from a worker, on purpose: one message at a time, in the caller's process; a retry
is due at once (its backoff is not waited for, so a test never sleeps); an ``auto`` handler's
measured kind is told to nobody. A message sent with a delay is waited for (until ``timeout``).

Made for ``memory://`` (``App.testing``), it runs on the other brokers too (the admin tests use
it on SQLite, PostgreSQL and RabbitMQ), with one limit: on RabbitMQ a retry waits in its TTL queue,
which ``queue_depth`` does not count, so a drain may end before a retry comes back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import sys
import time
import types
from collections.abc import Sequence
from typing import Any

import msgspec

from fastq import message as _message
from fastq import wire
from fastq.broker import open_broker
from fastq.broker.base import Broker, Message, Output, Retry, StoredResult
from fastq.broker.memory import MemoryBroker
from fastq.errors import ConfigError, MessageError, TaskFailed
from fastq.executors.app import AppExecutor
from fastq.wire import Status, WorkerSpec
from fastq.workflow.state import ref_of

__all__ = ["Drained", "EagerBroker", "drain", "drain_async"]

#: the module the executor imports a drained app from (by ``module:attribute``, as a worker does)
_MODULE = "_fastq_inline_apps"
#: deliveries taken from a queue at a time
BATCH = 100
_urls = itertools.count()


class Drained(msgspec.Struct, frozen=True, kw_only=True):
    """What one ``drain`` did: handler runs by their outcome (a retried message counts once per
    run)."""

    #: finished (acked), a return value kept or published included
    ok: int = 0
    #: failed and scheduled again
    retried: int = 0
    #: failed for good: dead-lettered, with the reason
    dead: int = 0

    @property
    def runs(self) -> int:
        return self.ok + self.retried + self.dead


class _Runtime:
    """What ``AppExecutor`` needs of a worker's runtime."""

    def __init__(self, spec: WorkerSpec, loop: asyncio.AbstractEventLoop) -> None:
        self.spec, self.loop = spec, loop

    def say(self, report: bytes) -> None:
        """A worker's report (an ``auto`` handler's kind): no supervisor here to plan by it."""


def _spec_of(app: Any) -> str:
    """``module:attribute`` by which the executor finds ``app`` itself (never a fresh import)."""
    module = sys.modules.get(_MODULE)
    if module is None:
        module = sys.modules[_MODULE] = types.ModuleType(_MODULE)
    name = f"app_{id(app)}"
    setattr(module, name, app)
    return f"{_MODULE}:{name}"


def _store(app: Any, broker: Broker) -> Broker | None:
    if getattr(app, "result_store_url", None):
        store: Broker = app.result_store
        return store
    return broker if broker.keeps_results else None


async def drain_async(
    app: Any, timeout: float = 10.0, *, queues: Sequence[str] | None = None
) -> Drained:
    """``drain`` for a coroutine (on the caller's loop)."""
    broker: Broker = app.broker
    # memory:// serves any loop; another broker is bound to the loop that opened it: a drain
    # (a loop of its own, each time) opens one of its own
    own = not isinstance(broker, MemoryBroker)
    if own:
        broker = open_broker(app.config.broker_url)
        for queue, options in app.queues().items():
            broker.configure(queue, options.amqp)
    try:
        return await _drain(app, broker, timeout, queues)
    finally:
        if own:
            await broker.close()


async def _drain(app: Any, broker: Broker, timeout: float, queues: Sequence[str] | None) -> Drained:
    await broker.open()
    names = list(queues) if queues is not None else sorted(app.queues())
    unknown = sorted(set(names) - set(app.queues()))
    if unknown:
        raise ConfigError(
            f"drain: the app consumes no queue {unknown[0]!r}; it consumes {sorted(app.queues())}"
        )
    store = _store(app, broker)
    if store is not None and store is not broker:
        await store.open()
    spec = WorkerSpec(
        index=0,
        parent=os.getpid(),
        cpu=None,
        app=_spec_of(app),
        queues=tuple(names),
        input_ring="",
        output_ring="",
        concurrency=1,
        executor="fastq.executors.app:AppExecutor",
        max_message_bytes=app.config.max_message_bytes,
    )
    executor = AppExecutor(_Runtime(spec, asyncio.get_running_loop()))  # type: ignore[arg-type]
    counts = {"ok": 0, "retried": 0, "dead": 0}
    deadline = time.monotonic() + timeout
    wait = 0.0
    try:
        while True:
            ran = 0
            for index, queue in enumerate(names):
                for d in await broker.fetch(queue, BATCH, timeout=wait):
                    ran += 1
                    await _run_one(executor, broker, store, queue, index, d, counts)
            if ran:
                wait = 0.0
                continue
            # none came: done unless some are delayed, or on their way (a broker that pushes)
            depths = {q: await broker.queue_depth(q) for q in names}
            waiting = [q for q, d in depths.items() if d.delayed or d.ready]
            if not waiting:
                return Drained(**counts)
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"drain: messages of {waiting} still wait (a delay, or the broker) after "
                    f"{timeout:g} s; raise timeout, or send without delay in tests"
                )
            wait = 0.05
    finally:
        executor.close()


async def _run_one(
    executor: AppExecutor,
    broker: Broker,
    store: Broker | None,
    queue: str,
    index: int,
    d: Any,
    counts: dict[str, int],
) -> None:
    status, _delay, payload = await executor.run(memoryview(d.body), d.retries, index)
    if status == Status.OK:
        counts["ok"] += 1
        await broker.settle(queue, ack=[d.tag])
    elif status == Status.RETRY:
        counts["retried"] += 1
        reason = payload.decode(errors="replace")
        await broker.settle(queue, retry=[Retry(d.tag, 0.0, reason)])
    elif status == Status.DEAD:
        counts["dead"] += 1
        await broker.settle(queue, dead=[(d.tag, payload.decode(errors="replace"))])
    else:  # VALUE, FAILED: a result to keep, messages to publish
        r = wire.parse_returned(payload)
        outputs = [
            Output(
                o.queue,
                Message(o.body, o.message_id, o.headers),
                o.exchange,
                o.exchange_kind,
                o.routing_key,
            )
            for o in r.outputs
        ]
        await broker.publish_outputs(outputs)
        step = ref_of(d.headers, d.retries + 1)
        if step is not None:  # a workflow step's outcome: recorded in its run, in the broker
            await broker.put_results(
                [StoredResult(d.message_id, r.handler, r.outcome, r.keep, step=step)]
            )
        elif r.keep and store is not None:
            await store.put_results(
                [StoredResult(d.message_id, r.handler, r.outcome, r.keep, r.notify)]
            )
        if r.reason:
            counts["dead"] += 1
            await broker.settle(queue, dead=[(d.tag, r.reason)])
        else:
            counts["ok"] += 1
            await broker.settle(queue, ack=[d.tag])


def drain(app: Any, timeout: float = 10.0, *, queues: Sequence[str] | None = None) -> Drained:
    """Run every message queued for ``app`` (all its queues, or ``queues``) in this process,
    through the workers' handler path, until none is left: retries run again at once, messages
    that fail for good become dead letters (with their reason), results are kept, outputs are
    published (and run too, when they go to a queue of the app).

    Returns:
        What ran, by outcome.

    Raises:
        TimeoutError: messages sent with a delay still wait after ``timeout`` seconds.
        ConfigError: a queue in ``queues`` is not one of the app's.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(drain_async(app, timeout, queues=queues))
    # called from a coroutine: run on a loop of its own, in a thread of its own
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastq-drain") as pool:
        return pool.submit(asyncio.run, drain_async(app, timeout, queues=queues)).result()


class EagerBroker(MemoryBroker):
    """A ``memory://`` broker whose sync publishes run their messages at once (``drain``), in
    the sender's process: ``app.testing(eager=True)``. A send whose message fails for good
    raises ``TaskFailed`` with the dead letter's reason (invalid arguments included)."""

    def __init__(self, app: Any) -> None:
        super().__init__(f"memory://eager-{os.getpid()}-{next(_urls)}")
        self.app = app
        #: a drain of this broker is under way (a handler's own sends are run by it)
        self.draining = False

    def publish_sync(self, queue: str, messages: Sequence[Message]) -> None:
        super().publish_sync(queue, messages)
        self._run_now(queue, {m.message_id for m in messages})

    def publish_unique_sync(self, queue: str, message: Message) -> str:
        holder = super().publish_unique_sync(queue, message)
        if holder == message.message_id:  # enqueued by this call (else another holds the key)
            self._run_now(queue, {holder})
        return holder

    def _run_now(self, queue: str, wanted: set[str]) -> None:
        """Drain the app (every queue: what a handler sends elsewhere runs too); TaskFailed
        when one of ``wanted`` became a dead letter."""
        if self.draining:
            return  # sent by a handler that runs now: the drain under way runs it too
        dead_before = {d.id for d in self.dead_letters(queue, limit=sys.maxsize)}
        self.draining = True
        try:
            drain(self.app)
        finally:
            self.draining = False
        for d in self.dead_letters(queue, limit=sys.maxsize):
            if d.id not in dead_before and d.message_id in wanted:
                try:
                    task = _message.decode(d.body).task
                except MessageError:
                    task = queue
                raise TaskFailed(d.message_id, task, "", "", "", d.reason)
