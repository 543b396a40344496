"""The platform's own event types have contracts in the same registry as producers' (real Postgres
and NATS): every platform append is checked like a producer's event, their types are reserved,
and `d2d contracts list` shows them."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import grpc
import orjson
import pytest

from d2d.client import IngestClient, make_event
from d2d.contracts import platform
from d2d.errors import Refusal
from d2d.eventlog import EventLog, GroupCommitter, NewEvent
from tests.conftest import run_cli

FREE_FORM = {"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}


def decision(**overrides: object) -> NewEvent:
    payload = {
        "decision_id": str(uuid.uuid4()), "model": "fraud", "model_version": "models/fraud/versions/1",
        "arm": "production", "score": 0.2, "action": "approve", "propensity": 1.0, "features": {}, "inputs": [0.5],
        "feature_watermark": 10, "entities": {"customer": "c1"}, "unit_id": "c1",
    }  # fmt: skip
    payload.update(overrides)
    return NewEvent(uuid.UUID(payload["decision_id"]), "decision.made", 1, "decision", str(payload["decision_id"]),
                    datetime.now(UTC), orjson.dumps(payload).decode())  # fmt: skip


async def test_a_platform_event_breaking_its_contract_is_refused_naming_the_field(event_log: EventLog) -> None:
    with pytest.raises(Refusal) as refused:
        await event_log.append([decision(propensity=0.0)])
    assert refused.value.code == "INVALID_ARGUMENT" and refused.value.field == "payload.propensity"
    committer = GroupCommitter(event_log)
    try:
        with pytest.raises(Refusal) as refused:
            await committer.append([decision(arm="both")])
        assert refused.value.field == "payload.arm"
        [stored] = await committer.append([decision()])
    finally:
        await committer.close()
    assert [e.seq for e in await event_log.read(0)] == [stored.seq]  # only the good one


async def test_the_platforms_contracts_are_listed_beside_producers_and_their_types_are_reserved(
    ingest: IngestClient, database_url: str
) -> None:
    listed = {c.event_type for c in await ingest.list_contract_versions()}
    assert {c.event_type for c in platform.CONTRACTS} <= listed and "payment.authorized" in listed
    code, out = await run_cli(
        {"D2D_INGEST_ADDR": ingest.target, "D2D_DATABASE_URL": database_url, "D2D_NATS_URL": "nats://unused"},
        "contracts", "list",
    )  # fmt: skip
    assert code == 0 and "decision.made" in out and "d2d-platform" in out
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ingest.create_contract_version("decision.made", owner="someone", json_schema=FREE_FORM)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    forged = make_event("decision.made", "decision", "d1", {"decision_id": "x"}, occurred_at=datetime.now(UTC))
    [result] = (await ingest.append([forged])).results
    assert result.error.code == grpc.StatusCode.PERMISSION_DENIED.value[0] and "platform event type" in (
        result.error.message
    )


def test_every_platform_contract_is_a_valid_draft_2020_12_object_schema() -> None:
    import jsonschema_rs

    for spec in platform.CONTRACTS:
        jsonschema_rs.meta.validate(spec.schema)
        assert spec.schema["type"] == "object" and spec.owner == "d2d-platform", spec.event_type
