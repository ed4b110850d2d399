"""OpenTelemetry traces from ``send()`` to the handler, written on the middleware hooks.

    app = fastq.App("shop", middleware=[fastq.tracing.TracingMiddleware()])

``before_send`` starts a PRODUCER span ("send <queue>") under the caller's current span and
injects its context into the message's headers with the global propagator (W3C ``traceparent``
and ``tracestate`` by default); they travel in the envelope. In the worker, ``before_process``
extracts that context and runs the handler inside a CONSUMER span ("process <queue>") whose
parent it is, with the queue, task, message id and attempt as attributes, and the outcome set in
``after_process``. The span is the current one while the handler runs, so what the handler sends,
and what it returns to ``publish_to``, is sent from inside it: outputs keep the trace. A retry is
the same envelope delivered again: its span has the same parent, in the same trace. A message
that never reaches a handler (``after_reject``: not an envelope, an unknown task, arguments that
do not validate) gets a span too, ended at once with an error status, outcome "dead" and the
reason, under its producer's span where its envelope could be read.

For ``@app.consumer`` queues the context comes from the broker message's own headers (AMQP
headers set by a foreign producer), which reach the worker with the body.

The spans go wherever the process's tracer provider sends them: configure the OpenTelemetry SDK
in the module that defines the App, so that the worker processes, which import it, do too.

Without this middleware nothing is traced and nothing is paid. opentelemetry-api is the otel extra
(``pip install 'fastq-engine[otel]'``) and this module is its only importer.
"""

from __future__ import annotations

from typing import Any

from fastq.errors import ConfigError
from fastq.middleware import Middleware, Processing, Sending

try:
    from opentelemetry import context, propagate, trace
    from opentelemetry.trace import SpanKind, StatusCode
except ImportError as e:  # pragma: no cover - exercised by the missing-extra test
    _missing: ImportError | None = e
else:
    _missing = None

__all__ = ["TracingMiddleware"]

#: the instrumentation scope the spans are made under
SCOPE = "fastq"


def _required() -> None:
    if _missing is not None:
        raise ConfigError(
            f"TracingMiddleware needs opentelemetry-api, which is not installed ({_missing}); "
            "install the otel extra: pip install 'fastq-engine[otel]'"
        )


class TracingMiddleware(Middleware):
    """Traces each message from ``send`` to its handler (see the module's docstring).

    Parameters:
        tracer_provider: where the spans go; default: the global one (``trace.set_tracer_provider``)
            as it is when the first span is made.

    Raises:
        ConfigError: opentelemetry-api is not installed (the message names the extra).
    """

    def __init__(self, tracer_provider: Any = None) -> None:
        _required()
        self.tracer = trace.get_tracer(SCOPE, tracer_provider=tracer_provider)

    def before_send(self, message: Sending) -> None:
        with self.tracer.start_as_current_span(
            f"send {message.queue}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "fastq",
                "messaging.operation.type": "send",
                "messaging.destination.name": message.queue,
                "messaging.message.id": message.message_id,
                "fastq.task": message.task,
            },
        ):
            propagate.inject(message.headers)

    def _span(self, message: Processing) -> Any:
        """The CONSUMER span of one delivery, under its producer's context when it came with
        one."""
        parent = propagate.extract(message.headers) if message.headers else None
        return self.tracer.start_span(
            f"process {message.queue}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "fastq",
                "messaging.operation.type": "process",
                "messaging.destination.name": message.queue,
                "messaging.message.id": message.message_id,
                "fastq.task": message.handler,
                "fastq.attempt": message.attempt,
            },
        )

    def before_process(self, message: Processing) -> None:
        span = self._span(message)
        # current while the handler runs: what it sends is sent from inside this span
        message.span = (span, context.attach(trace.set_span_in_context(span)))

    def after_reject(self, message: Processing, reason: str) -> None:
        span = self._span(message)
        span.set_attribute("fastq.outcome", "dead")
        span.set_attribute("fastq.reason", reason)
        span.set_status(StatusCode.ERROR, reason)
        span.end()

    def after_process(self, message: Processing, exc: BaseException | None) -> None:
        if message.span is None:  # an earlier before_process failed before ours ran
            return
        span, token = message.span
        message.span = None
        span.set_attribute("fastq.outcome", message.outcome)
        if exc is not None:
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
        span.end()
        context.detach(token)
