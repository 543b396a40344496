"""What every gRPC server and client of the platform has: tracing, health, reflection, limits,
and errors as `google.rpc.Status` with details a caller can act on."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc
from google.protobuf import any_pb2, duration_pb2
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


async def abort(context: grpc.aio.ServicerContext, st: status_pb2.Status) -> None:
    """End the call with a rich status (details in the `grpc-status-details-bin` trailer)."""
    await context.abort_with_status(rpc_status.to_status(st))
