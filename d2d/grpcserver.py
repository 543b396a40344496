"""What every gRPC server and client of the platform has: tracing, health, reflection, limits,
and errors as `google.rpc.Status` with details a caller can act on."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from d2d import telemetry

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
ERROR_DOMAIN = "data2data.io"

_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


def new_server(service_names: Iterable[str]) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with tracing, the health service (all names SERVING once started by the
    caller) and reflection for `service_names`."""
    server = grpc.aio.server(interceptors=telemetry.server_interceptors(), options=_OPTIONS)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Iterable[str]) -> None:
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


def channel(target: str) -> grpc.aio.Channel:
    """A traced client channel with the platform's message limits."""
    return grpc.aio.insecure_channel(target, options=_OPTIONS, interceptors=telemetry.client_interceptors())


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


def status(code: str, message: str, *, field: str = "", reason: str = "") -> status_pb2.Status:
    """A google.rpc.Status; `field` adds a BadRequest violation, `reason` an ErrorInfo."""
    details = []
    if field:
        details.append(field_violations([(field, message)]))
    if reason:
        details.append(error_info(reason))
    return status_pb2.Status(code=code_pb2.Code.Value(code), message=message, details=details)


def unavailable(message: str, retry_after_seconds: float) -> status_pb2.Status:
    """UNAVAILABLE with a RetryInfo telling the caller when to try again."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(retry_after_seconds * 1e9))
    retry = any_pb2.Any()
    retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message, details=[retry, error_info("LOG_UNAVAILABLE")])


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


def add_service(server: Any, service: ServiceDescriptor, servicer: object) -> None:
    """Serve every method of `service` (from its descriptor) with `servicer`'s coroutine of the same
    name. Requests are decoded leniently, so bytes that are not a valid message get
    INVALID_ARGUMENT naming the message type (grpc's default answer is INTERNAL)."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        implementation = getattr(servicer, method.name)
        request_type = message_factory.GetMessageClass(method.input_type)
        response_type = message_factory.GetMessageClass(method.output_type)
        type_name = method.input_type.full_name
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

            async def unary_stream(
                request: Any, context: Any, impl: Any = implementation, name: str = type_name
            ) -> Any:
                if isinstance(request, Malformed):
                    await _refuse_malformed(context, request, name)
                async for response in impl(request, context):
                    yield response

            handlers[method.name] = grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
        else:

            async def unary(request: Any, context: Any, impl: Any = implementation, name: str = type_name) -> Any:
                if isinstance(request, Malformed):
                    await _refuse_malformed(context, request, name)
                return await impl(request, context)

            handlers[method.name] = grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(service.full_name, handlers)])
