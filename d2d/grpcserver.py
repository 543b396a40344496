"""What every gRPC server and client of the platform has: API keys and roles, tracing, health,
reflection (off unless asked for), limits, and errors as `google.rpc.Status` with details a caller
can act on.

Every method of a service added with `add_service` needs an API key (`authorization: Bearer <key>`
metadata) whose role the method's `allowed_roles` option allows (d2d.auth): no usable key is
UNAUTHENTICATED, a role not allowed PERMISSION_DENIED naming the roles needed and the key's. The
handler finds the caller in `d2d.auth.current_principal`; the server span carries the key's id and
role (`d2d.api_key.id`, `d2d.api_key.role`). Health checks need no key. A `channel()` sends the key
it is given, else `D2D_API_KEY`'s.

TLS (d2d.config.GrpcTls, from the D2D_GRPC_TLS_* variables) is optional: a server bound with
`listen` serves TLS when given a certificate, and takes only callers with a certificate its client CA
signed when given one (mutual TLS; any other caller fails the handshake: UNAVAILABLE); a `channel()`
speaks TLS when given a CA. Keys are checked over TLS as without it.

Tracing is done here rather than by OpenTelemetry's gRPC interceptors, which cost about 160 us of
server CPU per call (a third of an empty call's) and an extra task per client call: a server span
per call of a service added with `add_service` (parented by the `traceparent` the caller sent in
metadata), and a client span per call made on a `channel()` (its context sent as metadata). Spans
are named and attributed as the interceptors name them (`/package.Service/Method`, `rpc.system`,
`rpc.service`, `rpc.method`, `rpc.grpc.status_code`). Health and reflection calls are not traced.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status
from opentelemetry import propagate, trace

from d2d import auth, telemetry
from d2d.config import GrpcTls
from d2d.errors import Refusal
from d2d.eventlog import LOG_UNREACHABLE

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
ERROR_DOMAIN = "data2data.io"

_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# No SO_REUSEPORT (grpc sets it by default): a second server on a port one already listens on, a
# second platform's say, fails to bind instead of silently taking half of the first one's calls.
_SERVER_OPTIONS = [*_OPTIONS, ("grpc.so_reuseport", 0)]


def new_server(
    service_names: Iterable[str], *, max_concurrent_rpcs: int | None = None, reflection_enabled: bool = False
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with the health service (all names SERVING once started by the caller,
    open to anyone) and, with `reflection_enabled` (D2D_GRPC_REFLECTION), reflection for
    `service_names`: off by default, as it tells an anonymous caller every method and message.
    With `max_concurrent_rpcs`, calls beyond that many in progress are refused at once with
    RESOURCE_EXHAUSTED (grpc's own check), which bounds the memory requests can hold: each may carry
    up to MAX_MESSAGE_BYTES. Services are added with `add_service`; the port is bound with `listen`
    (TLS as the settings say)."""
    server = grpc.aio.server(options=_SERVER_OPTIONS, maximum_concurrent_rpcs=max_concurrent_rpcs)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_enabled:
        names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server)
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Iterable[str]) -> None:
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def serve_until(
    server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, service_names: Sequence[str],
    stop: asyncio.Event, description: str,
) -> None:  # fmt: skip
    """Mark the (started) server SERVING, run until `stop`, then drain it: health says NOT_SERVING
    and calls in flight get up to 5 s to finish."""
    await set_serving(health_servicer, service_names)
    log.info("%s", description)
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    await server.stop(grace=5)


def listen(server: grpc.aio.Server, addr: str, tls: GrpcTls, service: str) -> int:
    """Bind `service`'s `server` to `addr`: TLS if `tls` names a certificate (mutual TLS if it names
    a client CA too), else plaintext; returns the port bound. A port that cannot be bound (another
    process holds it) or a TLS configuration that cannot work (GrpcTls.server_credentials, naming
    its variable) is a SystemExit saying so: the process ends with that line, not a traceback."""
    credentials = tls.server_credentials()
    try:
        if credentials is None:
            port = server.add_insecure_port(addr)
        else:
            port = server.add_secure_port(addr, credentials)
    except RuntimeError as exc:  # grpc's "Failed to bind to address ..."
        raise SystemExit(f"{service}: cannot listen on {addr} ({str(exc).split(';')[0]})") from exc
    if port == 0:  # older grpc answered 0 instead of raising
        raise SystemExit(f"{service}: cannot listen on {addr}")
    return port


@functools.lru_cache(maxsize=8)
def channel_credentials(tls: GrpcTls) -> grpc.ChannelCredentials | None:
    """`tls`'s client credentials (None: plaintext), its files read and checked once per process."""
    return tls.channel_credentials()


def channel(target: str, api_key: str | None = None, tls: GrpcTls | None = None) -> TracedChannel:
    """A traced client channel with the platform's message limits whose calls carry `api_key`
    (default: the D2D_API_KEY environment variable; '' sends none), over TLS if `tls` (default:
    the D2D_GRPC_TLS_* variables) names a CA."""
    if api_key is None:
        api_key = os.environ.get("D2D_API_KEY", "")
    credentials = channel_credentials(GrpcTls.from_env() if tls is None else tls)
    if credentials is None:
        return TracedChannel(grpc.aio.insecure_channel(target, options=_OPTIONS), api_key)
    return TracedChannel(grpc.aio.secure_channel(target, credentials, options=_OPTIONS), api_key)


# ---------------------------------------------------------------------------------------------
# Tracing


def _rpc_attributes(full_method: str) -> dict[str, Any]:
    service, _, method = full_method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def _end(span: trace.Span, code: grpc.StatusCode, exc: BaseException | None = None) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else exc
        span.set_status(trace.Status(trace.StatusCode.ERROR, code.name + (f": {detail}" if detail else "")))


def _client_code(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()
    return grpc.StatusCode.CANCELLED if isinstance(exc, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN


class _TracedCall:
    """One method of a TracedChannel: each call runs in a CLIENT span whose context goes along as
    metadata. Calls return what the stub's caller awaits (a response) or iterates (a stream)."""

    def __init__(
        self, method: str, inner: Any, response_streaming: bool, credentials: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self.name = method
        self.inner = inner
        self.credentials = credentials
        self.attributes = _rpc_attributes(method)
        self.response_streaming = response_streaming
        self.tracer = telemetry.tracer("d2d.grpc")

    def _span(self) -> Any:
        return self.tracer.start_as_current_span(
            self.name, kind=trace.SpanKind.CLIENT, attributes=self.attributes,
            record_exception=False, set_status_on_exception=False,
        )  # fmt: skip

    def _metadata(self, metadata: Any) -> list[tuple[str, str]]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return [*(metadata or ()), *self.credentials, *carrier.items()]

    def __call__(self, request: Any, *, metadata: Any = None, **kwargs: Any) -> Any:
        if self.response_streaming:
            return self._stream(request, metadata, kwargs)
        return self._unary(request, metadata, kwargs)

    async def _unary(self, request: Any, metadata: Any, kwargs: dict[str, Any]) -> Any:
        with self._span() as span:
            try:
                response = await self.inner(request, metadata=self._metadata(metadata), **kwargs)
            except BaseException as exc:
                _end(span, _client_code(exc), exc)
                raise
            _end(span, grpc.StatusCode.OK)
            return response

    async def _stream(self, request: Any, metadata: Any, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        with self._span() as span:
            try:
                async for response in self.inner(request, metadata=self._metadata(metadata), **kwargs):
                    yield response
            except BaseException as exc:
                _end(span, _client_code(exc), exc)
                raise
            _end(span, grpc.StatusCode.OK)


class TracedChannel:
    """A grpc.aio channel whose stubs' calls are traced (see the module's docstring)."""

    def __init__(self, inner: grpc.aio.Channel, api_key: str = "") -> None:
        self._inner = inner
        self._credentials = ((auth.METADATA_KEY, f"Bearer {api_key}"),) if api_key else ()

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> _TracedCall:
        return _TracedCall(method, self._inner.unary_unary(method, *args, **kwargs), False, self._credentials)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> _TracedCall:
        return _TracedCall(method, self._inner.stream_unary(method, *args, **kwargs), False, self._credentials)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> _TracedCall:
        return _TracedCall(method, self._inner.unary_stream(method, *args, **kwargs), True, self._credentials)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> _TracedCall:
        return _TracedCall(method, self._inner.stream_stream(method, *args, **kwargs), True, self._credentials)

    def __getattr__(self, name: str) -> Any:  # close, channel_ready, get_state, ...
        return getattr(self._inner, name)

    async def __aenter__(self) -> TracedChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._inner.close()


def _server_span(tracer: trace.Tracer, full_method: str, attributes: dict[str, Any], context: Any) -> Any:
    parent = propagate.extract(dict(context.invocation_metadata() or ()))
    return tracer.start_as_current_span(
        full_method, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes,
        record_exception=False, set_status_on_exception=False,
    )  # fmt: skip


def _server_end(span: trace.Span, context: Any, exc: BaseException | None) -> None:
    """Record how the call ended: OK, the code it was aborted with, or UNKNOWN for an exception."""
    code = context.code()  # the StatusCode given to abort() or set_code(); None if neither ran
    if code is None and exc is None:
        code = grpc.StatusCode.OK
    elif code is None:
        code = grpc.StatusCode.CANCELLED if isinstance(exc, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN
        span.record_exception(exc)
    _end(span, code, None if exc is None or isinstance(exc, grpc.aio.AbortError) else exc)


async def _authorize(keys: auth.KeyRing, roles: frozenset[str], full_method: str, context: Any, span: Any) -> None:
    """Let the call through if its key's role is in `roles` (the caller then in
    auth.current_principal, its key on the span), else end it UNAUTHENTICATED or PERMISSION_DENIED."""
    try:
        principal = await keys.authenticate(auth.bearer_token(context.invocation_metadata()))
    except auth.Unauthenticated as exc:
        await abort(context, status("UNAUTHENTICATED", str(exc), reason=exc.reason))
    span.set_attribute("d2d.api_key.id", principal.key_id)
    span.set_attribute("d2d.api_key.role", principal.role)
    if principal.role not in roles:
        needed = " or ".join(sorted(roles - {auth.ADMIN})) + " (or admin)" if len(roles) > 1 else auth.ADMIN
        await abort(
            context,
            status(
                "PERMISSION_DENIED",
                f"{full_method} needs role {needed}; API key {principal.key_id} has role {principal.role}",
                reason="ROLE_NOT_ALLOWED",
                info={"required_roles": ",".join(sorted(roles)), "key_role": principal.role},
            ),
        )  # fmt: skip
    try:
        keys.limiter.take(principal.key_id, principal.rate, time.monotonic())
    except Refusal as refused:
        await abort(
            context,
            status(refused.code, refused.message, reason="RATE_LIMITED", retry_after=refused.retry_after,
                   info={"key_id": principal.key_id}),
        )  # fmt: skip
    auth.current_principal.set(principal)


def _traced_method(
    tracer: trace.Tracer, full_method: str, impl: Callable[..., Any], response_streaming: bool,
    keys: auth.KeyRing, roles: frozenset[str],
) -> Any:  # fmt: skip
    """`impl` run inside a SERVER span (see the module's docstring), for callers whose role is in `roles`."""
    attributes = _rpc_attributes(full_method)
    if response_streaming:

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            with _server_span(tracer, full_method, attributes, context) as span:
                try:
                    try:
                        await _authorize(keys, roles, full_method, context, span)
                        async for response in impl(request, context):
                            yield response
                    except Exception as exc:
                        await _answer_exception(context, full_method, exc)
                        raise
                except BaseException as exc:
                    _server_end(span, context, exc)
                    raise
                _server_end(span, context, None)

        return streaming

    async def unary(request: Any, context: Any) -> Any:
        with _server_span(tracer, full_method, attributes, context) as span:
            try:
                try:
                    await _authorize(keys, roles, full_method, context, span)
                    response = await impl(request, context)
                except Exception as exc:
                    await _answer_exception(context, full_method, exc)
                    raise
            except BaseException as exc:
                _server_end(span, context, exc)
                raise
            _server_end(span, context, None)
            return response

    return unary


async def _answer_exception(context: Any, full_method: str, exc: Exception) -> None:
    """End a call whose handler raised with a precise status, never grpc's UNKNOWN: a Refusal's
    own code, UNAVAILABLE (with RetryInfo) when Postgres is away, INTERNAL naming the error's type
    for anything else (logged with its traceback, and its trace id in the message)."""
    if isinstance(exc, grpc.aio.AbortError) or context.code() is not None:
        return  # the handler already chose the status
    if isinstance(exc, Refusal):
        await abort(context, refusal_status(exc))
    if isinstance(exc, LOG_UNREACHABLE):
        await abort(context, unavailable(f"the event log is unreachable ({type(exc).__name__}); retry", 1.0))
    span_context = trace.get_current_span().get_span_context()
    trace_id = format(span_context.trace_id, "032x") if span_context.is_valid else "none"
    log.error("%s failed (trace %s)", full_method, trace_id, exc_info=exc)
    await abort(
        context,
        status(
            "INTERNAL", f"the service failed on this request ({type(exc).__name__}); trace id {trace_id}",
            reason="INTERNAL_ERROR",
        ),
    )  # fmt: skip


def refusal_status(refusal: Refusal) -> status_pb2.Status:
    """The google.rpc.Status of a Refusal: its code, a BadRequest naming its field, RetryInfo if it has a delay."""
    return status(refusal.code, refusal.message, field=refusal.field, retry_after=refusal.retry_after)


def field_violations(violations: Sequence[tuple[str, str]]) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(
        error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations
            ]
        )
    )
    return detail


def error_info(reason: str, **metadata: str) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))
    return detail


MAX_STATUS_MESSAGE = 1_000  # characters of a status message; even as 4-byte UTF-8, twice, well inside 16 KiB


def status(
    code: str, message: str, *, field: str = "", reason: str = "", retry_after: float | None = None,
    info: dict[str, str] | None = None,
) -> status_pb2.Status:  # fmt: skip
    """A google.rpc.Status; `field` adds a BadRequest violation, `reason` an ErrorInfo (with `info`
    as its metadata), `retry_after`
    (seconds) a RetryInfo telling the caller when to try again. A message longer than MAX_STATUS_MESSAGE
    characters (one quoting a request's field of megabytes, say) is cut there, saying so: it travels
    in the trailers, twice, and grpc drops a call whose trailers pass 16 KiB, answering the caller
    RESOURCE_EXHAUSTED instead of this status."""
    if len(message) > MAX_STATUS_MESSAGE:
        message = f"{message[:MAX_STATUS_MESSAGE]}... (cut: {len(message):,} characters in all)"
    details = []
    if field:
        details.append(field_violations([(field, message)]))
    if reason:
        details.append(error_info(reason, **(info or {})))
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    return status_pb2.Status(code=code_pb2.Code.Value(code), message=message, details=details)


def unavailable(message: str, retry_after_seconds: float) -> status_pb2.Status:
    """UNAVAILABLE with a RetryInfo telling the caller when to try again."""
    return status("UNAVAILABLE", message, reason="LOG_UNAVAILABLE", retry_after=retry_after_seconds)


async def fail(
    context: grpc.aio.ServicerContext, code: str, message: str, field: str = "", *, reason: str = ""
) -> None:
    """End the call with `code`, a BadRequest naming `field` if given, an ErrorInfo if `reason`."""
    await abort(context, status(code, message, field=field, reason=reason))


async def abort(context: grpc.aio.ServicerContext, st: status_pb2.Status) -> None:
    """End the call with a rich status (details in the `grpc-status-details-bin` trailer)."""
    await context.abort_with_status(rpc_status.to_status(st))


class Malformed:
    """Stands in for a request whose bytes are not a valid protobuf message."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except Exception as exc:  # DecodeError, invalid UTF-8 in a string field, ...
            return Malformed(exc)

    return deserialize


async def _refuse_malformed(context: grpc.aio.ServicerContext, request: Malformed, type_name: str) -> None:
    await abort(
        context,
        status("INVALID_ARGUMENT", f"request is not a valid {type_name}: {request.error}", reason="MALFORMED_REQUEST"),
    )


def _refusing_malformed(impl: Callable[..., Any], type_name: str, response_streaming: bool) -> Any:
    """`impl`, answering INVALID_ARGUMENT for request bytes that are not a `type_name`. Run after the
    caller's key is checked: a caller without one learns nothing about what it sent."""
    if response_streaming:

        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await _refuse_malformed(context, request, type_name)
            async for response in impl(request, context):
                yield response

        return streaming

    async def unary(request: Any, context: Any) -> Any:
        if isinstance(request, Malformed):
            await _refuse_malformed(context, request, type_name)
        return await impl(request, context)

    return unary


def add_service(server: Any, service: ServiceDescriptor, servicer: object, keys: auth.KeyRing) -> None:
    """Serve every method of `service` (from its descriptor) with `servicer`'s coroutine of the same
    name, to callers whose API key (checked against `keys`) has a role the method's `allowed_roles`
    option allows; a method without the option is a ValueError naming it, before anything is served.
    Requests are decoded leniently, so bytes that are not a valid message get INVALID_ARGUMENT
    naming the message type (grpc's default answer is INTERNAL)."""
    if not isinstance(keys, auth.KeyRing):
        raise TypeError(f"add_service({service.full_name}) needs the KeyRing that authenticates its callers")
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    tracer = telemetry.tracer("d2d.grpc")
    roles = {method.name: auth.roles_of(method) for method in service.methods}  # every method declares them
    for method in service.methods:
        full_method = f"/{service.full_name}/{method.name}"
        type_name = method.input_type.full_name
        handler = getattr(servicer, method.name)
        if not method.client_streaming:  # (a client stream's messages are checked as the handler reads them)
            handler = _refusing_malformed(handler, type_name, method.server_streaming)
        implementation = _traced_method(tracer, full_method, handler, method.server_streaming, keys, roles[method.name])
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        kwargs = {
            "request_deserializer": _lenient(request_type),
            "response_serializer": response_type.SerializeToString,
        }
        if method.client_streaming and method.server_streaming:
            raise NotImplementedError(f"{method.full_name}: bidirectional streaming is not used by the platform")
        if method.client_streaming:

            async def stream_unary(
                requests: Any, context: Any, impl: Any = implementation, name: str = type_name
            ) -> Any:
                async def checked() -> Any:
                    async for request in requests:
                        if isinstance(request, Malformed):
                            await _refuse_malformed(context, request, name)
                        yield request

                return await impl(checked(), context)

            handlers[method.name] = grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(implementation, **kwargs)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(implementation, **kwargs)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service.full_name, handlers)])
