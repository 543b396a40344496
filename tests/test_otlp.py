"""Traces reach a collector over OTLP, as docker-compose sends them to Jaeger: the services run as
their own processes with OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP receiver in this test, and
one Predict's trace holds serving's span of the call and the append of its `decision.made`.

The model is registered from an artifact trained here on noise (no log to train from is needed to
serve it): what matters is the path a Predict's spans take, not its score.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
import numpy as np
import pytest
import xgboost as xgb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from d2d import eventlog
from d2d.client import RegistryClient, ServingClient
from d2d.features.store import register_views
from d2d.runtime.servers import NatsServer, free_port
from d2d.runtime.services import service
from d2d.runtime.supervisor import Child
from d2d.sim.training import default_spec
from d2d.sim.views import VIEWS
from d2d.training.spec import input_names
from d2d.v1 import registry_pb2

PREDICT_SPAN = "/d2d.v1.ServingService/Predict"
COMMIT_SPAN = "serving.commit"  # the Predict's wait for its decision's append
APPEND_SPAN = "eventlog.group_commit"  # the append itself, shared by the Predicts it commits
MODEL = "fraud"


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    links: frozenset[tuple[str, str]]  # (trace id, span id) of each linked span


@dataclass
class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector keeping every span it is sent."""

    spans: list[Span] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def Export(  # noqa: N802 (the OTLP service's method name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    links = frozenset((k.trace_id.hex(), k.span_id.hex()) for k in s.links)
                    received.append(Span(attributes.get("service.name", ""), s.name, s.trace_id.hex(),
                                         s.span_id.hex(), s.parent_span_id.hex(), s.kind, links))  # fmt: skip
        with self.lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def linking_to(self, trace_id: str, span_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if (trace_id, span_id) in s.links]


@pytest.fixture
def otlp() -> Iterator[tuple[Receiver, str]]:
    """The receiver and its endpoint (what OTEL_EXPORTER_OTLP_ENDPOINT is set to)."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield receiver, f"http://127.0.0.1:{port}"
    server.stop(grace=None)


def noise_model() -> tuple[bytes, list[str]]:
    """An XGBoost artifact taking the default spec's inputs, and their names."""
    names = input_names(default_spec(), VIEWS)
    rng = np.random.default_rng(0)
    data = xgb.DMatrix(rng.random((200, len(names))), label=rng.integers(0, 2, 200), feature_names=names)
    booster = xgb.train({"objective": "binary:logistic", "nthread": 1}, data, 3)
    return bytes(booster.save_raw(raw_format="ubj")), names


async def test_one_predicts_trace_holds_servings_span_and_its_decisions_append(
    otlp: tuple[Receiver, str],
    database_url: str,
    nats_server: NatsServer,
    namespace: str,
    start_service: Callable[..., Child],
) -> None:
    receiver, endpoint = otlp
    pool = await eventlog.create_pool(database_url, max_size=2)
    log = eventlog.EventLog(pool)
    await register_views(log, VIEWS)  # what the features service does at its start
    addrs = {name: f"127.0.0.1:{free_port()}" for name in ("registry", "serving", "features")}
    env = {
        "D2D_DATABASE_URL": database_url, "D2D_NATS_URL": nats_server.url, "D2D_NATS_NAMESPACE": namespace,
        **{service(name).addr_env: addr for name, addr in addrs.items()},
        "D2D_REGISTRY_RETRAIN_LOOP": "0",
        # as docker-compose.yml sets them, plus a short export delay (the SDK's default is 5 s)
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }  # fmt: skip
    for name in ("ingest-relay", "registry", "serving"):
        await asyncio.to_thread(start_service, list(service(name).args), env, name)

    artifact, names = noise_model()
    async with RegistryClient(addrs["registry"]) as registry:
        await registry.wait_ready()
        await registry.create_model(MODEL)
        request = registry_pb2.RegisterModelVersionRequest(
            parent=f"models/{MODEL}", artifact=artifact, spec_json=json.dumps(default_spec().to_dict()),
            feature_names=names, evaluation_json=json.dumps({"auc": 0.5}),
        )  # fmt: skip
        await registry.stub.RegisterModelVersion(request)
        await registry.set_alias(MODEL, "production", 1)

    entities = {"customer": "cus_1", "merchant": "mer_1", "card": "card_1"}
    context = {"amount": 12.5, "channel": "ecom", "occurred_at": datetime.now(UTC).isoformat()}
    predict = ServingClient.request(MODEL, entities, context, unit_id="cus_1", request_id=uuid.uuid4().hex)
    async with ServingClient(addrs["serving"]) as serving:
        await serving.wait_ready()
        for _ in range(300):  # until serving has loaded the version the alias names
            try:
                answer = await serving.stub.Predict(predict, timeout=10)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
                await asyncio.sleep(0.1)
        else:
            raise TimeoutError("serving did not serve the production version")
    decision = await log.get(uuid.UUID(answer.decision_id))
    await pool.close()
    assert decision is not None and decision.type == "decision.made"
    trace_id = decision.payload["trace_id"]

    for _ in range(300):  # the services export in batches
        spans = receiver.of_trace(trace_id)
        predicts = [s for s in spans if s.name == PREDICT_SPAN and s.kind == trace_pb2.Span.SPAN_KIND_SERVER]
        commits = [s for s in spans if s.name == COMMIT_SPAN]
        appends = [a for c in commits for a in receiver.linking_to(trace_id, c.span_id) if a.name == APPEND_SPAN]
        if predicts and commits and appends:
            break
        await asyncio.sleep(0.1)
    [predict_span] = predicts
    [commit] = commits
    assert predict_span.service == commit.service == "serving"
    assert commit.parent_id == predict_span.span_id, "the decision's commit is part of the Predict"
    assert appends and all(a.service == "serving" for a in appends), "the append links to the Predict's commit"
    assert decision.metadata["traceparent"].split("-")[1:3] == [trace_id, predict_span.span_id]
