"""The protos are the contract: generated code is fresh and every RPC is served."""

from __future__ import annotations

import grpc

from d2d import protogen
from d2d.v1 import ingest_pb2
from services.ingest import api


def test_generated_code_matches_the_protos() -> None:
    assert protogen.stale_files() == [], "run `python -m d2d.protogen`"


def test_every_ingest_rpc_in_the_proto_has_a_handler() -> None:
    registered: dict[str, object] = {}

    class Recorder:
        def add_generic_rpc_handlers(self, handlers: list[grpc.GenericRpcHandler]) -> None:
            registered.update(handlers[0]._method_handlers)  # type: ignore[attr-defined]

    api.add_to_server(api.IngestApi(None, None, None, None), Recorder())  # type: ignore[arg-type]
    service = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"]
    expected = {f"/{service.full_name}/{m.name}" for m in service.methods}
    assert set(registered) == expected


def test_enum_zero_values_are_unspecified() -> None:
    for enum in [*ingest_pb2.DESCRIPTOR.enum_types_by_name.values(), ingest_pb2.DeadLetter.State.DESCRIPTOR]:
        assert enum.values_by_number[0].name.endswith("UNSPECIFIED"), enum.full_name
