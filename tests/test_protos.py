"""The protos are the contract: generated code is fresh and every RPC is served."""

from __future__ import annotations

import pytest

from d2d import protogen
from d2d.v1 import features_pb2, ingest_pb2
from services.features.api import FeatureApi
from services.ingest.api import IngestApi


def test_generated_code_matches_the_protos() -> None:
    assert protogen.stale_files() == [], "run `python -m d2d.protogen`"


@pytest.mark.parametrize(
    ("module", "service", "servicer"),
    [(ingest_pb2, "IngestService", IngestApi), (features_pb2, "FeatureService", FeatureApi)],
)
def test_every_rpc_in_the_proto_is_implemented(module, service: str, servicer: type) -> None:  # noqa: ANN001
    methods = module.DESCRIPTOR.services_by_name[service].methods
    missing = [m.name for m in methods if not callable(getattr(servicer, m.name, None))]
    assert missing == []


def test_enum_zero_values_are_unspecified() -> None:
    enums = [*ingest_pb2.DESCRIPTOR.enum_types_by_name.values(), ingest_pb2.DeadLetter.State.DESCRIPTOR]
    for enum in enums:
        assert enum.values_by_number[0].name.endswith("UNSPECIFIED"), enum.full_name
