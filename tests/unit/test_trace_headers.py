"""TracingMiddleware without processes: what send puts in the headers, and the missing extra."""

from __future__ import annotations

import pytest

import fastq
from fastq.errors import ConfigError

pytest.importorskip("opentelemetry.sdk")


def test_send_injects_a_w3c_traceparent_of_its_producer_span():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from fastq.tracing import TracingMiddleware

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = fastq.App("t", broker="memory://tracing-unit", middleware=[TracingMiddleware(provider)])

    @app.task(name="ship", queue="ships")
    def ship(n: int) -> None: ...

    m = ship.message(1)
    (span,) = exporter.get_finished_spans()
    ctx = span.get_span_context()
    assert span.name == "send ships" and span.attributes["messaging.message.id"] == m.message_id
    traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
    assert m.headers == {"traceparent": traceparent}


def test_tracing_without_the_extra_is_a_config_error_naming_it(monkeypatch):
    import fastq.tracing

    monkeypatch.setattr(fastq.tracing, "_missing", ImportError("No module named 'opentelemetry'"))
    with pytest.raises(
        ConfigError,
        match=r"^TracingMiddleware needs opentelemetry-api, which is not installed \(No module "
        r"named 'opentelemetry'\); install the otel extra: pip install 'fastq-engine\[otel\]'$",
    ):
        fastq.tracing.TracingMiddleware()
