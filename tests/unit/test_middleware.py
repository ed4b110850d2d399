"""Middleware that sees the message: async hooks and their order, headers added on the sending
side read on the processing side, the outcome and return value after processing, messages that
never reach a handler, and old-style middleware unchanged. The worker's executor runs in this
process, on a loop of its own, with no rings and no processes."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import msgspec
import pytest

import fastq
from fastq import logs, message, wire
from fastq.errors import ConfigError
from fastq.executors.app import AppExecutor
from fastq.middleware import Processing, Sending
from fastq.wire import Status

EVENTS: list[str] = []
SEEN: list[tuple[str, str, str, int, dict[str, str], str, object]] = []


class AsyncOuter(fastq.Middleware):
    async def before_process(self, message: Processing) -> None:
        await asyncio.sleep(0)
        EVENTS.append(f"outer before {message.handler}")

    async def after_process(self, message: Processing, exc: BaseException | None) -> None:
        await asyncio.sleep(0)
        EVENTS.append(f"outer after {message.outcome}")


class SyncInner(fastq.Middleware):
    def before_process(self, message: Processing) -> None:
        EVENTS.append("inner before")

    def after_process(self, message: Processing, exc: BaseException | None) -> None:
        EVENTS.append(f"inner after {type(exc).__name__ if exc else None}")
        SEEN.append(
            (
                message.id,
                message.task,
                message.queue,
                message.attempt,
                dict(message.headers),
                message.outcome,
                message.result,
            )
        )


class Tenant(fastq.Middleware):
    def before_send(self, message: Sending) -> None:
        message.headers["x-tenant"] = f"acme/{message.task}/{message.queue}"


class Rejects(fastq.Middleware):
    def after_reject(self, message: Processing, reason: str) -> None:
        EVENTS.append(f"rejected {message.handler!r}: {reason[:20]}")


class OldStyle:  # no base class, sync hooks of the first middleware API
    def before_process(self, message):
        EVENTS.append(f"old before {message.handler} {message.retries}")

    def after_process(self, message, exc):
        EVENTS.append(f"old after {message.result}")


APP = fastq.App(
    "mw",
    broker="memory://middleware-tests",
    middleware=[AsyncOuter(), Tenant(), SyncInner(), Rejects()],
)


@APP.task(name="add", queue="mw", kind="io", max_retries=1)
async def add(a: int, b: int) -> int:
    EVENTS.append("handler")
    if a < 0:
        raise ValueError("negative")
    return a + b


@APP.consumer("mw.raw", kind="io")
async def raw(body: bytes) -> bytes:
    return body


@APP.task(name="loud", queue="mw", kind="io")
def loud(n: int) -> None:  # a plain function of kind io: it runs in the worker's thread pool
    logging.getLogger("shop").warning("working on %d", n)


OLD = fastq.App("old", broker="memory://middleware-old", middleware=[OldStyle()])


@OLD.task(name="double", queue="old", kind="cpu")
def double(n: int) -> int:
    return 2 * n


class _Runtime:
    def __init__(self, app: str, queue: str, metrics: bool = False) -> None:
        self.spec = wire.WorkerSpec(
            index=0,
            parent=0,
            cpu=None,
            app=app,
            queues=(queue,),
            input_ring="",
            output_ring="",
            concurrency=4,
            executor="fastq.executors.app:AppExecutor",
            metrics=metrics,
        )


def _run(executor: AppExecutor, body: bytes, retries: int = 0) -> tuple[int, float, bytes]:
    async def main() -> tuple[int, float, bytes]:
        executor.runtime.loop = asyncio.get_running_loop()  # type: ignore[attr-defined]
        return await executor.run(memoryview(body), retries, 0)

    return asyncio.run(main())


@pytest.fixture
def executor():
    EVENTS.clear()
    SEEN.clear()
    e = AppExecutor(_Runtime("test_middleware:APP", "mw"))  # type: ignore[arg-type]
    yield e
    e.close()


def test_async_and_sync_hooks_run_in_order_around_the_handler(executor):
    # Given an async outer middleware and a sync inner one
    status, _, _ = _run(executor, add.message(1, 2).body)
    # Then befores run in order, afters in reverse, the async ones awaited in their place
    assert status == Status.OK
    assert EVENTS == [
        "outer before add",
        "inner before",
        "handler",
        "inner after None",
        "outer after ok",
    ]


def test_headers_added_by_before_send_reach_the_handlers_middleware(executor):
    # Given a message made by send's path (before_send adds a header)
    m = add.message(2, 3)
    assert m.headers == {"x-tenant": "acme/add/mw"}
    assert message.decode(m.body).headers == {"x-tenant": "acme/add/mw"}
    # When a worker processes it
    _run(executor, m.body)
    # Then its middleware sees the header, the id, task, queue, attempt, outcome and value
    assert SEEN == [(m.message_id, "add", "mw", 1, {"x-tenant": "acme/add/mw"}, "ok", 5)]


def test_the_enqueue_time_is_the_send_time_and_reaches_the_worker(executor):
    seen: list[float] = []

    class When(fastq.Middleware):
        def before_process(self, message: Processing) -> None:
            seen.append(message.enqueued_at)

    executor.hooks.before.append((When().before_process, False))
    body = add.message(1, 1).body
    _run(executor, body)
    assert seen == [message.decode(body).enqueued_at] and seen[0] > 0


def test_failures_are_seen_as_retried_then_dead_with_the_attempt(executor):
    body = add.message(-1, 0).body
    first = _run(executor, body, retries=0)
    second = _run(executor, body, retries=1)
    assert (first[0], second[0]) == (Status.RETRY, Status.DEAD)
    assert [(s[3], s[5], s[6]) for s in SEEN] == [(1, "retried", None), (2, "dead", None)]
    assert EVENTS.count("inner after ValueError") == 2
    assert EVENTS[-1] == "outer after dead"


def test_a_message_that_never_reaches_a_handler_is_seen_by_after_reject(executor):
    status, _, reason = _run(executor, message.encode("nope", (1,))[1])
    assert status == Status.DEAD and reason.startswith(b"unknown task 'nope'")
    assert EVENTS == ["rejected 'nope': unknown task 'nope':"]
    EVENTS.clear()
    assert _run(executor, b"\xc1")[0] == Status.DEAD
    assert EVENTS == ["rejected '': undecodable: body of"]


def test_old_style_middleware_works_unchanged():
    EVENTS.clear()
    e = AppExecutor(_Runtime("test_middleware:OLD", "old"))  # type: ignore[arg-type]
    try:
        status, _, _ = _run(e, double.message(21).body, retries=2)
    finally:
        e.close()
    assert status == Status.OK
    assert EVENTS == ["old before double 2", "old after 42"]


def test_a_hook_that_raises_fails_the_message_and_later_hooks_see_it(executor):
    class Broken(fastq.Middleware):
        def after_process(self, message: Processing, exc: BaseException | None) -> None:
            raise RuntimeError("metrics down")

    executor.hooks.after.insert(0, (Broken().after_process, False))
    status, _, reason = _run(executor, add.message(1, 1).body)
    assert (status, reason) == (Status.RETRY, b"RuntimeError: metrics down")
    assert EVENTS[-2:] == ["inner after RuntimeError", "outer after retried"]


def test_middleware_that_overrides_nothing_adds_no_hook():
    hooks = fastq.App("n", broker="memory://n", middleware=[fastq.Middleware()]).hooks
    assert (hooks.before, hooks.after, hooks.reject, hooks.send) == ([], [], [], [])


def test_an_async_before_send_is_refused_with_what_to_change():
    class Late(fastq.Middleware):
        async def before_send(self, message: Sending) -> None:  # type: ignore[override]
            pass

    with pytest.raises(
        ConfigError,
        match=r"^test_an_async_before_send_is_refused_with_what_to_change.<locals>.Late."
        r"before_send is async def; before_send runs inside send\(\), which is synchronous: "
        r"make it a plain function$",
    ):
        fastq.App("late", broker="memory://late", middleware=[Late()])


def test_the_tally_counts_runs_by_outcome_and_bins_durations():
    EVENTS.clear()
    e = AppExecutor(_Runtime("test_middleware:APP", "mw", metrics=True))  # type: ignore[arg-type]
    try:
        for _ in range(3):
            _run(e, add.message(1, 2).body)
        _run(e, add.message(-1, 2).body, retries=0)
        _run(e, add.message(-1, 2).body, retries=1)
        _run(e, message.encode("nope", (1,))[1])
        (frame,) = e.reports()
        assert e.reports() == []  # the counts restart after a report
    finally:
        e.close()
    tag, report, _ = wire.COMPLETION.unpack_from(frame)
    assert (tag, report) == (0, wire.Report.TALLY)
    counts = {c.task: c for c in wire.parse_tally(frame[wire.COMPLETION.size :])}
    c = counts["add"]
    assert (c.queue, c.processed, c.failed, c.retried, c.dead) == ("mw", 5, 2, 1, 1)
    assert sum(c.handler_buckets) == 5 and sum(c.latency_buckets) == 5
    assert msgspec.structs.astuple(counts["nope"])[2:6] == (0, 0, 0, 1)


def test_a_consumer_s_middleware_sees_the_broker_headers_that_came_with_the_delivery():
    EVENTS.clear()
    SEEN.clear()
    e = AppExecutor(_Runtime("test_middleware:APP", "mw.raw"))  # type: ignore[arg-type]
    try:
        # Given a delivery whose broker headers the supervisor put in front of the body
        body = wire.with_headers({"traceparent": "00-ab-cd-01"}, b"raw bytes")
        status, _, _ = _run(e, body, retries=1 | wire.WITH_HEADERS)
    finally:
        e.close()
    # Then the handler got the body alone, and the middleware the headers and the attempt
    assert status == Status.OK
    ((_, task, queue, attempt, headers, outcome, result),) = SEEN
    assert (queue, attempt, headers, outcome, result) == (
        "mw.raw",
        2,
        {"traceparent": "00-ab-cd-01"},
        "ok",
        b"raw bytes",
    )
    assert task.endswith("raw")


def test_json_log_lines_name_the_message_whose_handler_logged():
    # Given a worker whose logs are JSON lines
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        e = AppExecutor(_Runtime("test_middleware:APP", "mw"))  # type: ignore[arg-type]
        try:
            made = loud.message(7)
            status, _, _ = _run(e, made.body)
        finally:
            e.close()
        logging.getLogger("shop").warning("outside any handler")
    finally:
        root.removeHandler(handler)
    # Then what the handler logged (in a thread of the pool) names its message; the rest not
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert status == Status.OK
    assert (inside["message"], inside["queue"], inside["task"], inside["message_id"]) == (
        "working on 7",
        "mw",
        "loud",
        made.message_id,
    )
    assert outside["message"] == "outside any handler" and "task" not in outside
