"""OpenTelemetry traces through a real `fastq worker` (SQLite, two worker processes): the
producer's span in this process, the handler's spans in the workers (exported to a file by the
SDK, configured in the app's module as a user would), linked across processes, across a retry,
and across a publish_to output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastq.testing import terminate, wait_until

pytest.importorskip("opentelemetry.sdk")

APP = """
import json, os
import fastq
from fastq.tracing import TracingMiddleware
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

SPANS, MARKS = {spans!r}, {marks!r}


class ToFile(SpanExporter):  # the workers' spans, one JSON line each (O_APPEND: one write)
    def export(self, spans):
        fd = os.open(SPANS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        for s in spans:
            line = dict(
                name=s.name,
                trace=s.context.trace_id,
                span=s.context.span_id,
                parent=s.parent.span_id if s.parent else None,
                kind=s.kind.name,
                attributes=dict(s.attributes),
                pid=os.getpid(),
            )
            os.write(fd, json.dumps(line).encode() + b"\\n")
        os.close(fd)
        return SpanExportResult.SUCCESS


MEMORY = InMemorySpanExporter()  # this process's own spans (the test reads the producer's)
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(MEMORY))
if os.environ.get("TRACE_TO_FILE") == "1":  # the worker processes
    provider.add_span_processor(SimpleSpanProcessor(ToFile()))
trace.set_tracer_provider(provider)

app = fastq.App("traced", broker="sqlite:///{db}", middleware=[TracingMiddleware()])


@app.task(name="receipt", queue="t.receipts", kind="io")
async def receipt(total: int) -> None:
    pass


@app.task(name="charge", queue="t.charges", kind="io", max_retries=2, retry_backoff=0.01,
          publish_to=receipt)
async def charge(n: int) -> int:
    mark = os.path.join(MARKS, str(n))
    if not os.path.exists(mark):  # the first attempt fails, the retry passes
        open(mark, "w").close()
        raise RuntimeError("card network down")
    return n * 10


@app.consumer("t.raw", kind="io")
async def raw(body: bytes) -> None:
    if body != b"from another program":
        raise ValueError(body)
"""


@pytest.fixture
def traced(tmp_path: Path):
    (tmp_path / "marks").mkdir()
    spans = tmp_path / "spans.jsonl"
    (tmp_path / "traced_app.py").write_text(
        textwrap.dedent(
            APP.format(db=tmp_path / "q.db", spans=str(spans), marks=str(tmp_path / "marks"))
        )
    )
    sys.path.insert(0, str(tmp_path))
    import traced_app

    log = open(tmp_path / "worker.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastq", "worker", "traced_app:app", "--processes", "2"],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "TRACE_TO_FILE": "1"},
    )

    def read() -> list[dict]:
        assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        if not spans.exists():
            return []
        return [json.loads(line) for line in spans.read_text().splitlines()]

    yield traced_app, read, lambda: (tmp_path / "worker.log").read_text()[-3000:]
    terminate(proc)
    log.close()
    sys.path.remove(str(tmp_path))
    sys.modules.pop("traced_app", None)


@pytest.mark.multiprocess
def test_one_trace_links_the_producer_the_retried_handler_and_its_output(traced):
    app, read, logtext = traced
    from opentelemetry import trace

    # Given a send inside a span of this process
    with trace.get_tracer("test").start_as_current_span("checkout") as root:
        message_id = app.charge.send(7)
    ours = {s.name: s for s in app.MEMORY.get_finished_spans()}
    send = ours["send t.charges"]
    trace_id = root.get_span_context().trace_id
    assert send.context.trace_id == trace_id and send.parent.span_id == root.context.span_id

    # When the workers run it: it fails once, passes on the retry, and its output runs
    def done() -> bool:
        return len([s for s in read() if s["kind"] == "CONSUMER"]) >= 3

    wait_until(done, 60, logtext)
    spans = read()
    handled = [s for s in spans if s["name"] == "process t.charges"]
    (out_send,) = [s for s in spans if s["name"] == "send t.receipts"]
    (out,) = [s for s in spans if s["name"] == "process t.receipts"]
    # Then every span is in the producer's trace
    assert {s["trace"] for s in spans} == {trace_id}
    # both attempts are children of the producer's span, each with its attempt and outcome
    assert [s["parent"] for s in handled] == [send.context.span_id] * 2
    assert sorted(
        (s["attributes"]["fastq.attempt"], s["attributes"]["fastq.outcome"]) for s in handled
    ) == [(1, "retried"), (2, "ok")]
    assert {s["attributes"]["messaging.message.id"] for s in handled} == {message_id}
    assert {s["attributes"]["fastq.task"] for s in handled} == {"charge"}
    # the output was sent from inside the passing attempt's span, and handled under it
    (passed,) = [s for s in handled if s["attributes"]["fastq.outcome"] == "ok"]
    assert out_send["parent"] == passed["span"] and out_send["kind"] == "PRODUCER"
    assert out["parent"] == out_send["span"] and out["attributes"]["fastq.outcome"] == "ok"
    # and the handler spans ran in the worker processes, not here
    assert all(s["pid"] != os.getpid() for s in spans)


@pytest.mark.multiprocess
def test_a_consumer_span_continues_the_trace_of_a_foreign_producers_headers(traced):
    app, read, logtext = traced
    from fastq.broker.base import Message

    # Given a message from another program, with a W3C traceparent in its broker headers
    trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
    traceparent = f"00-{trace_id:032x}-{span_id:016x}-01"
    app.app.broker.publish_sync(
        "t.raw", [Message(b"from another program", "foreign-1", {"traceparent": traceparent})]
    )

    # When the consumer runs it
    def done() -> bool:
        return any(s["name"] == "process t.raw" for s in read())

    wait_until(done, 60, logtext)
    (span,) = [s for s in read() if s["name"] == "process t.raw"]
    # Then its span is the foreign span's child, in the foreign trace, and the body is intact
    assert (span["trace"], span["parent"]) == (trace_id, span_id)
    assert span["attributes"]["fastq.outcome"] == "ok"
