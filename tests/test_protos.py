"""The protos are the contract: generated code is fresh and every RPC is served."""

from __future__ import annotations

import pytest

from d2d import protogen
from d2d.v1 import access_pb2, event_pb2, features_pb2, feedback_pb2, ingest_pb2, registry_pb2, serving_pb2
from services.features.api import FeatureApi
from services.feedback.api import FeedbackApi
from services.ingest.api import IngestApi
from services.registry.access import AccessApi
from services.registry.api import RegistryApi
from services.serving.api import ServingApi

SERVICES = [
    (ingest_pb2, "IngestService", IngestApi),
    (features_pb2, "FeatureService", FeatureApi),
    (registry_pb2, "RegistryService", RegistryApi),
    (serving_pb2, "ServingService", ServingApi),
    (feedback_pb2, "FeedbackService", FeedbackApi),
    (access_pb2, "AccessService", AccessApi),
]


def test_generated_code_matches_the_protos() -> None:
    assert protogen.stale_files() == [], "run `python -m d2d.protogen`"


@pytest.mark.parametrize(("module", "service", "servicer"), SERVICES)
def test_every_rpc_in_the_proto_is_implemented(module, service: str, servicer: type) -> None:  # noqa: ANN001
    methods = module.DESCRIPTOR.services_by_name[service].methods
    assert methods, f"{service} declares no RPC"
    missing = [m.name for m in methods if not callable(getattr(servicer, m.name, None))]
    assert missing == []


def test_every_service_in_the_protos_is_covered() -> None:
    declared = {
        name for module in (ingest_pb2, features_pb2, registry_pb2, serving_pb2, feedback_pb2, access_pb2)
        for name in module.DESCRIPTOR.services_by_name
    }  # fmt: skip
    assert declared == {service for _, service, _ in SERVICES}


@pytest.mark.parametrize(
    "module", [event_pb2, ingest_pb2, features_pb2, registry_pb2, serving_pb2, feedback_pb2, access_pb2]
)
def test_enum_zero_values_are_unspecified(module) -> None:  # noqa: ANN001
    enums = list(module.DESCRIPTOR.enum_types_by_name.values())
    pending = list(module.DESCRIPTOR.message_types_by_name.values())
    while pending:  # enums nested in messages too
        message = pending.pop()
        enums += message.enum_types
        pending += message.nested_types
    for enum in enums:
        assert enum.values_by_number[0].name.endswith("UNSPECIFIED"), enum.full_name
