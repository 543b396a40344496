"""OpenTelemetry for every process: one tracer provider, gRPC interceptors, NATS header context.

Spans go to OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, else as JSON lines to
`<data dir>/traces/<service>.jsonl`. Trace context travels in gRPC metadata (the interceptors),
in NATS message headers (`inject_headers` / `extract_context`) and in each event's metadata
(`traceparent`), so a consumer's span links to the producer's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

_provider: TracerProvider | None = None


class JsonLinesSpanExporter(SpanExporter):
    """Writes one JSON object per finished span to a file."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in shutdown
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(span.to_json(indent=None) + "\n" for span in spans)
        with self._lock:
            self._file.write(lines)
            self._file.flush()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            self._file.close()


def setup_tracing(service_name: str, data_dir: Path | None = None) -> TracerProvider:
    """Install the process-wide tracer provider (once) and return it."""
    global _provider
    if _provider is not None:
        return _provider
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    exporter: SpanExporter | None
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    elif data_dir is not None:
        exporter = JsonLinesSpanExporter(Path(data_dir) / "traces" / f"{service_name}.jsonl")
    else:
        exporter = None
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def server_interceptors() -> list[Any]:
    """Interceptors for a grpc.aio server: a span per call, parented by the caller's context."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor()]


def client_interceptors() -> list[Any]:
    """Interceptors for a grpc.aio channel: a span per call, context sent in metadata."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def inject_headers(headers: dict[str, str] | None = None, ctx: otel_context.Context | None = None) -> dict[str, str]:
    """Add W3C trace context (`traceparent`, `tracestate`) of `ctx` or the current span."""
    headers = dict(headers or {})
    propagate.inject(headers, context=ctx)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context carried by message headers or event metadata."""
    return propagate.extract(dict(headers or {}))


def current_traceparent() -> str | None:
    return inject_headers().get("traceparent")
