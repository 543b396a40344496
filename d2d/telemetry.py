"""OpenTelemetry for every process: one tracer provider, trace context for gRPC (see grpcserver) and NATS headers.

Spans go to OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, else as JSON lines to
`<data dir>/traces/<service>.jsonl`. Trace context travels in gRPC metadata (`d2d.grpcserver`),
in NATS message headers (`inject_headers` / `extract_context`) and in each event's metadata
(`traceparent`), so a consumer's span links to the producer's.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import orjson
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from d2d.private import open_private, private_dir

_provider: TracerProvider | None = None
EXPORT_BATCH = 64
# Links a span keeps (the SDK's default is 128): a span of work shared by many requests links to
# every one it served, and a group commit can serve this many callers.
MAX_LINKS = 20_000


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """A finished span as plain data (ids in hex, times in ns since the epoch)."""
    ctx = span.context
    return {
        "name": span.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "kind": span.kind.name,
        "start_time": span.start_time,
        "end_time": span.end_time,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "events": [{"name": e.name, "time": e.timestamp, "attributes": dict(e.attributes or {})} for e in span.events],
        "links": [
            {"trace_id": f"{k.context.trace_id:032x}", "span_id": f"{k.context.span_id:016x}"} for k in span.links
        ],
        "service": span.resource.attributes.get("service.name"),
    }


class JsonLinesSpanExporter(SpanExporter):
    """Writes one JSON object per finished span to a file (orjson: a quarter of the SDK's to_json
    cost, which matters because export holds the GIL the service's event loop needs)."""

    def __init__(self, path: Path) -> None:
        private_dir(path.parent)
        self._file: IO[bytes] = open_private(path, "ab")  # closed in shutdown; spans may hold personal data
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = b"".join(orjson.dumps(span_record(span), default=str) + b"\n" for span in spans)
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
    limits = SpanLimits(max_links=None if os.environ.get("OTEL_SPAN_LINK_COUNT_LIMIT") else MAX_LINKS)
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}), span_limits=limits)
    exporter: SpanExporter | None
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    elif data_dir is not None:
        exporter = JsonLinesSpanExporter(Path(data_dir) / "traces" / f"{service_name}.jsonl")
    else:
        exporter = None
    if exporter is not None:
        # Export in batches of 64 rather than the SDK's 512: encoding a batch holds the GIL the
        # service's event loop needs, and 512 spans (about 3 ms) stall every call in flight.
        batch = None if os.environ.get("OTEL_BSP_MAX_EXPORT_BATCH_SIZE") else EXPORT_BATCH
        provider.add_span_processor(BatchSpanProcessor(exporter, max_export_batch_size=batch))
    trace.set_tracer_provider(provider)
    _provider = provider
    return provider


def shutdown_tracing() -> None:
    if _provider is not None:
        _provider.shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def inject_headers(headers: dict[str, str] | None = None, ctx: otel_context.Context | None = None) -> dict[str, str]:
    """Add W3C trace context (`traceparent`, `tracestate`) of `ctx` or the current span."""
    headers = dict(headers or {})
    propagate.inject(headers, context=ctx)
    return headers


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context carried by message headers or event metadata."""
    return propagate.extract(dict(headers or {}))


def links(carriers: Iterable[Mapping[str, str] | None]) -> list[trace.Link]:
    """A span link to each carrier's (message headers', event metadata's) valid trace context: how
    work shared by many messages names every one it served."""
    found = []
    for carrier in carriers:
        ctx = trace.get_current_span(extract_context(carrier)).get_span_context()
        if ctx.is_valid:
            found.append(trace.Link(ctx))
    return found


def current_traceparent() -> str | None:
    return inject_headers().get("traceparent")
