"""A message that never reaches a handler still leaves a span: under its producer's span where
its envelope could be read, ended with an error status, outcome "dead" and the reason."""

from __future__ import annotations

import asyncio

import pytest

import fastq
from fastq import message, wire
from fastq.executors.app import AppExecutor
from fastq.wire import Status

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode

from fastq.tracing import TracingMiddleware

SPANS = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(SPANS))
APP = fastq.App(
    "rejects", broker="memory://tracing-rejects", middleware=[TracingMiddleware(_provider)]
)


@APP.task(name="add", queue="tr", kind="io")
async def add(a: int, b: int) -> int:
    return a + b


def _run(body: bytes) -> int:
    class Runtime:
        spec = wire.WorkerSpec(
            index=0,
            parent=0,
            cpu=None,
            app="test_tracing_rejects:APP",
            queues=("tr",),
            input_ring="",
            output_ring="",
            concurrency=1,
            executor="",
        )

    e = AppExecutor(Runtime())  # type: ignore[arg-type]

    async def main() -> int:
        e.runtime.loop = asyncio.get_running_loop()  # type: ignore[attr-defined]
        return (await e.run(memoryview(body), 0, 0))[0]

    try:
        return asyncio.run(main())
    finally:
        e.close()


def test_a_rejected_message_gets_an_error_span_under_its_producer():
    SPANS.clear()
    trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    headers = {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01"}
    # Given an envelope naming no task of the app, and one whose arguments do not validate
    _, unknown = message.encode("nope", (1,), message_id="m-unknown", headers=headers)
    _, invalid = message.encode("add", ("x", 2), message_id="m-invalid", headers=headers)
    assert [_run(unknown), _run(invalid), _run(b"\xc1 not msgpack")] == [Status.DEAD] * 3
    spans = {s.attributes["messaging.message.id"]: s for s in SPANS.get_finished_spans()}
    assert set(spans) == {"m-unknown", "m-invalid", ""}
    for mid in ("m-unknown", "m-invalid"):
        s = spans[mid]
        assert (s.context.trace_id, s.parent.span_id) == (trace_id, span_id)
        assert s.status.status_code is StatusCode.ERROR
        assert s.attributes["fastq.outcome"] == "dead"
    assert spans["m-unknown"].attributes["fastq.reason"].startswith("unknown task 'nope'")
    assert spans["m-invalid"].status.description.startswith("invalid arguments for add")
    # a body that is not an envelope has no producer to continue: a trace of its own
    garbage = spans[""]
    assert garbage.parent is None and garbage.name == "process tr"
    assert garbage.attributes["fastq.reason"].startswith("undecodable")
