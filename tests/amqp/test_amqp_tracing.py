"""On RabbitMQ: a plain pika producer's W3C traceparent (an AMQP header) becomes the parent of the
span a fastq consumer's handler runs in, in a real `fastq worker`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pika
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

SPANS = {spans!r}


class ToFile(SpanExporter):
    def export(self, spans):
        fd = os.open(SPANS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        for s in spans:
            line = dict(name=s.name, trace=s.context.trace_id,
                        parent=s.parent.span_id if s.parent else None,
                        outcome=s.attributes.get("fastq.outcome"))
            os.write(fd, json.dumps(line).encode() + b"\\n")
        os.close(fd)
        return SpanExportResult.SUCCESS


provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(ToFile()))
trace.set_tracer_provider(provider)
app = fastq.App("traced", broker={url!r}, middleware=[TracingMiddleware()])


@app.consumer({q!r}, kind="io")
async def raw(body: bytes) -> None:
    assert body == b"from another program", body
"""


@pytest.mark.multiprocess
def test_a_pika_producers_traceparent_is_the_parent_of_the_consumers_span(tmp_path, amqp_url):
    q = f"fq-test-{uuid.uuid4().hex[:8]}.traced"
    module = f"amqp_traced_{uuid.uuid4().hex[:8]}"
    spans = tmp_path / "spans.jsonl"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(APP.format(url=amqp_url, q=q, spans=str(spans)))
    )
    log = open(tmp_path / "worker.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastq", "worker", f"{module}:app", "--processes", "1"],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        channel.queue_declare(q, durable=True)
        # Given a message from another program, with a W3C traceparent in its AMQP headers
        trace_id, span_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331
        headers = {"traceparent": f"00-{trace_id:032x}-{span_id:016x}-01"}
        channel.basic_publish(
            "", q, b"from another program", pika.BasicProperties(delivery_mode=2, headers=headers)
        )

        def read() -> list[dict]:
            assert proc.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            text = spans.read_text() if spans.exists() else ""
            return [json.loads(line) for line in text.splitlines()]

        # When the fastq consumer runs it
        wait_until(lambda: read(), 60, lambda: (tmp_path / "worker.log").read_text()[-3000:])
        # Then its span continues the producer's trace, under the producer's span
        assert read() == [{"name": f"process {q}", "trace": trace_id, "parent": span_id,
                           "outcome": "ok"}]  # fmt: skip
    finally:
        terminate(proc)
        log.close()
        channel = connection.channel()
        for name in (q, f"{q}.dlq"):
            channel.queue_delete(name)
        connection.close()
