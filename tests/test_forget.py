"""Personal data and the right to be forgotten on an append-only log (issue 15, crypto-shredding), on
real Postgres and NATS: ingest stores the fields a contract marks personal sealed under their
subject's key; `d2d forget` destroys the key; then `replay verify` still passes, explain shows that
subject's fields erased and the other subject's intact, frames are unchanged, and no clear value of
the forgotten fields is left in any table, in any message of the stream or in the spans exported.

The ingest pipeline and the relay run in this process (the pipeline is what every ingested event
passes, whether it came by gRPC, NATS or redrive)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import jsonschema_rs
import nats
import orjson
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from d2d import bus, dbroles
from d2d.contracts.platform import register_platform_contracts
from d2d.contracts.registry import ContractRegistry
from d2d.contracts.validation import check_payload
from d2d.deadletters import DeadLetters
from d2d.errors import Refusal
from d2d.eventlog import EventLog, GroupCommitter, create_pool
from d2d.features.definitions import Aggregate, FeatureView
from d2d.features.offline import FrameRow, training_frame
from d2d.features.store import register_views
from d2d.outbox import OutboxRelay, relay_name
from d2d.personal import KeyStore, envelopes, forget, reveal
from d2d.replay.explain import fed_events
from d2d.replay.verify import verify
from d2d.runtime.servers import NatsServer
from d2d.sim import load_contracts
from services.ingest.api import _from_dead_letter
from services.ingest.pipeline import Ingestor, Outcome, candidate_from_json
from tests.conftest import run_cli, service_url, settings_env

T0 = datetime(2026, 1, 1, 10, tzinfo=UTC)
ADA = {
    "customer_id": "cus_000001", "name": "Ada Lovelace", "email": "ada.lovelace@example.org", "country": "GB",
    "registered_at": "2026-01-01T10:00:00Z", "risk_segment": "low",
}  # fmt: skip
GRACE = {
    "customer_id": "cus_000002", "name": "Grace Hopper", "email": "grace.hopper@example.org", "country": "US",
    "registered_at": "2026-01-01T10:00:00Z", "risk_segment": "medium",
}  # fmt: skip
FORGOTTEN_VALUES = (ADA["name"], ADA["email"])
CUSTOMERS = FeatureView(
    name="customer_profile", entity="customer", entity_key="customer_id", source="customer.registered",
    aggregates=(Aggregate("registrations", "count"), Aggregate("segment", "last", "risk_segment")),
)  # fmt: skip


@dataclass
class Ingest:
    ingestor: Ingestor
    log: EventLog  # as the ingest service
    owner: asyncpg.Pool
    audit: asyncpg.Pool  # as the audit service's group: may read keys
    features: EventLog  # as the features service's group: registers views

    async def send(self, payload: dict, *, event_id: uuid.UUID | None = None, at: datetime = T0) -> Outcome:
        envelope = {
            "event_id": str(event_id or uuid.uuid4()), "entity_type": "customer",
            "entity_id": payload["customer_id"], "occurred_at": at.isoformat(), "payload": payload,
        }  # fmt: skip
        [outcome] = await self.ingestor.ingest(
            [candidate_from_json("nats:d2d.in.customer.registered", "customer.registered", orjson.dumps(envelope))]
        )
        return outcome


@pytest.fixture
async def ingest(database_url: str) -> AsyncIterator[Ingest]:
    """The ingest pipeline as the ingest service builds it, logged in as ingest, with the
    simulator's contracts (customer.registered marks /name and /email personal)."""
    pool = await create_pool(service_url(database_url, "ingest"), max_size=4)
    owner = await create_pool(database_url, max_size=2)
    audit = await create_pool(database_url, role="d2d_audit", max_size=2)
    features = await create_pool(database_url, role="d2d_features", max_size=1)
    log = EventLog(pool)
    registry = ContractRegistry(log)
    await register_platform_contracts(registry)
    for spec in load_contracts():
        await registry.register(spec.event_type, owner=spec.owner, json_schema=spec.schema, pii_fields=spec.pii_fields)
    committer = GroupCommitter(log)
    try:
        yield Ingest(Ingestor(registry, committer, DeadLetters(pool)), log, owner, audit, EventLog(features))
    finally:
        await committer.close()
        for p in (pool, owner, audit, features):
            await p.close()


async def stored_payloads(log: EventLog) -> dict[str, tuple[uuid.UUID, dict]]:
    """customer id -> (event id, stored payload) of each customer.registered."""
    return {e.entity_id: (e.event_id, e.payload) for e in await log.read(0, 1000, types=["customer.registered"])}


async def test_personal_fields_are_stored_sealed_and_only_a_key_reader_sees_them(ingest: Ingest) -> None:
    assert (await ingest.send(ADA)).ok
    event_id, stored = (await stored_payloads(ingest.log))["cus_000001"]
    assert {p for p, _ in envelopes(stored)} == {"/name", "/email"}
    assert stored["country"] == "GB" and stored["risk_segment"] == "low"  # not personal: in clear
    assert not any(v in orjson.dumps(stored).decode() for v in FORGOTTEN_VALUES)
    [revealed] = await KeyStore(ingest.audit).reveal([(event_id, stored)])
    assert revealed.payload == ADA and revealed.erased == () and revealed.personal == {
        "/name": "Ada Lovelace", "/email": "ada.lovelace@example.org"
    }  # fmt: skip


async def test_a_ciphertext_moved_to_another_event_or_field_does_not_open(ingest: Ingest) -> None:
    for payload in (ADA, {**ADA, "name": "Ada King"}):
        assert (await ingest.send(payload)).ok
    first, second = await ingest.log.read(0, 10, types=["customer.registered"])
    keys = await KeyStore(ingest.audit).keys(["customer/cus_000001"])
    moved_event = {**second.payload, "name": first.payload["name"]}  # same subject, same field, other event
    moved_field = {**first.payload, "email": first.payload["name"]}  # same event, other field
    assert reveal(moved_event, second.event_id, keys).unreadable == ("/name",)
    assert reveal(moved_event, second.event_id, keys).payload["name"] is None
    assert reveal(moved_field, first.event_id, keys).unreadable == ("/email",)
    assert reveal(first.payload, first.event_id, keys).payload["name"] == "Ada Lovelace"


async def test_a_refused_event_never_repeats_a_personal_value(ingest: Ingest) -> None:
    outcome = await ingest.send({**ADA, "email": "not an email address"})
    assert outcome.code == "INVALID_ARGUMENT" and outcome.field == "payload.email"
    assert "not an email address" not in outcome.message and "personal data" in outcome.message


async def test_a_refusal_of_an_object_holding_a_personal_field_does_not_quote_it(ingest: Ingest) -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "minProperties": 2,
        "properties": {"contact": {"type": "object", "maxProperties": 1}},
    }  # fmt: skip
    registry = ingest.ingestor.registry
    await registry.register("person.noted", owner="t", json_schema=schema, pii_fields=["/contact/email"])
    for payload in ({"contact": {"email": "ada.lovelace@example.org"}},  # the whole payload fails
                    {"contact": {"email": "ada.lovelace@example.org", "phone": "1"}, "n": 1}):  # fmt: skip
        with pytest.raises(Refusal) as refused:
            await registry.validate("person.noted", 0, orjson.dumps(payload))
        assert "ada.lovelace" not in refused.value.message and "personal data" in refused.value.message


async def test_a_refused_personal_event_is_kept_sealed_redriven_in_clear_and_erased_with_its_subject(
    ingest: Ingest,
) -> None:
    outcome = await ingest.send({**ADA, "country": "gb"})  # refused: the country breaks its pattern
    [letter] = await ingest.ingestor.dead_letters.get([outcome.dead_letter_id])
    assert b"Ada Lovelace" not in letter.raw and b"ada.lovelace" not in letter.raw
    [raw] = await ingest.ingestor.open_kept([letter])
    candidate = _from_dead_letter(letter, orjson.dumps({**ADA, "country": "GB"}), raw)
    assert orjson.loads(raw)["payload"] == {**ADA, "country": "gb"}
    [redriven] = await ingest.ingestor.ingest([candidate], keep_rejected=False)
    assert redriven.ok
    stored = (await ingest.log.read(0, 100, types=["customer.registered"]))[-1]
    assert b"Ada Lovelace" not in orjson.dumps(stored.payload)  # sealed on its way in, as any event

    await forget(ingest.owner, "customer/cus_000001", requested_by="privacy-desk")
    assert await ingest.ingestor.open_kept([letter]) == [None]
    erased = _from_dead_letter(letter, None, None)
    assert erased.refusal is not None and erased.refusal.code == "FAILED_PRECONDITION"
    assert "forgotten" in erased.refusal.message


async def test_stored_payloads_pass_their_contract_except_for_the_sealed_fields_they_hold(ingest: Ingest) -> None:
    """What a contract check on stored events (an upcaster's samples) sees: the envelopes are not
    counted against the schema, every other field is."""
    assert (await ingest.send(ADA)).ok
    [stored] = await ingest.log.read(0, 10, types=["customer.registered"])
    [spec] = [c for c in load_contracts() if c.event_type == "customer.registered"]
    validator = jsonschema_rs.validator_for(spec.schema)
    sealed = tuple(p for p, _ in envelopes(stored.payload))
    with pytest.raises(Refusal):
        check_payload(validator, orjson.dumps(stored.payload))
    assert check_payload(validator, orjson.dumps(stored.payload), sealed=sealed)
    with pytest.raises(Refusal) as refused:
        check_payload(validator, orjson.dumps({**stored.payload, "country": "gb"}), sealed=sealed)
    assert refused.value.field == "payload.country"


async def test_a_view_reading_a_personal_field_is_refused_at_registration_naming_it(ingest: Ingest) -> None:
    by_email = FeatureView(
        name="customer_emails", entity="customer", entity_key="customer_id", source="customer.registered",
        aggregates=(Aggregate("emails", "distinct_count", "email"),),
    )  # fmt: skip
    with pytest.raises(Refusal) as refused:
        await register_views(ingest.features, [by_email])
    assert refused.value.code == "FAILED_PRECONDITION"
    assert refused.value.field == "views.customer_emails.aggregates.emails.field" and "/email" in refused.value.message
    assert await register_views(ingest.features, [CUSTOMERS])  # one reading no personal field registers


async def test_marking_personal_a_field_a_registered_view_reads_is_refused_naming_the_view(ingest: Ingest) -> None:
    await register_views(ingest.features, [CUSTOMERS])  # reads /risk_segment
    [spec] = [c for c in load_contracts() if c.event_type == "customer.registered"]
    with pytest.raises(Refusal) as refused:
        await ingest.ingestor.registry.register(
            spec.event_type, owner=spec.owner, json_schema=spec.schema, pii_fields=[*spec.pii_fields, "/risk_segment"]
        )
    assert refused.value.code == "FAILED_PRECONDITION" and refused.value.field == "contract_version.pii_fields"
    assert "customer_profile" in refused.value.message and "/risk_segment" in refused.value.message
    assert (await ingest.ingestor.registry.get("customer.registered")).version == 1


async def published_payloads(nats_url: str, namespace: str) -> list[bytes]:
    """Every message body on the namespace's events stream."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        topology = bus.Topology(namespace)
        total = (await js.stream_info(topology.events_stream)).state.messages
        sub = await js.pull_subscribe(
            f"{topology.events_prefix}.>", stream=topology.events_stream,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL),
        )  # fmt: skip
        bodies: list[bytes] = []
        while len(bodies) < total:
            bodies += [m.data for m in await sub.fetch(1000, timeout=5)]
        return bodies
    finally:
        await nc.close()


async def every_value_in_the_database(owner: asyncpg.Pool) -> list[bytes]:
    """Every row of every table, as text (bytea columns as their bytes)."""
    found: list[bytes] = []
    async with owner.acquire() as conn:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        for table in (t["tablename"] for t in tables):
            for row in await conn.fetch(f'SELECT * FROM "{table}"'):
                found += [v if isinstance(v, bytes) else str(v).encode() for v in row.values()]
    return found


def span_texts(spans: InMemorySpanExporter) -> list[str]:
    return [s.to_json() for s in spans.get_finished_spans()]


async def test_forgetting_a_subject_erases_its_fields_everywhere_and_changes_no_other_number(
    ingest: Ingest, database_url: str, nats_server: NatsServer, namespace: str, spans: InMemorySpanExporter
) -> None:
    topology = bus.Topology(namespace)
    nc = await nats.connect(nats_server.url)
    relay_pool = await create_pool(service_url(database_url, "ingest-relay"), max_size=2)
    relay = OutboxRelay(
        EventLog(relay_pool), nc.jetstream(), name=relay_name(topology.events_stream),
        stream=topology.events_stream, subject_prefix=topology.events_prefix,
    )  # fmt: skip
    stop = asyncio.Event()
    relaying = asyncio.create_task(relay.run(stop))
    try:
        await register_views(ingest.features, [CUSTOMERS])
        for i, customer in enumerate((ADA, GRACE, {**ADA, "risk_segment": "high"})):
            assert (await ingest.send(customer, at=T0 + timedelta(minutes=i))).ok
        await ingest.send({**ADA, "email": "broken"})  # refused: kept in dead letters
        rows = [FrameRow({"customer": c}, T0 + timedelta(hours=1)) for c in ("cus_000001", "cus_000002")]
        frame_before = await training_frame(ingest.log, [CUSTOMERS], rows)

        done = await forget(ingest.owner, "customer/cus_000001", requested_by="privacy-desk", reason="ticket 42")
        assert done.seq > 0
        head = await ingest.log.head()
        for _ in range(200):
            if relay.stats.position >= head:
                break
            await asyncio.sleep(0.05)
        assert relay.stats.position == head
    finally:
        stop.set()
        await asyncio.wait_for(relaying, 10)
        await nc.close()
        await relay_pool.close()

    # Readers: the forgotten subject's fields are erased, the other's intact.
    audit_log = EventLog(ingest.audit)
    explained = await fed_events(
        audit_log, [CUSTOMERS], {"customer": "cus_000001"}, (T0 + timedelta(hours=1)).timestamp(), head
    )
    ada_events = explained["customer_profile"]["events"]
    assert len(ada_events) == 2 and all(e["erased"] == ["/name", "/email"] for e in ada_events)
    assert all(e["personal"] == {"/name": None, "/email": None} for e in ada_events)
    explained = await fed_events(
        audit_log, [CUSTOMERS], {"customer": "cus_000002"}, (T0 + timedelta(hours=1)).timestamp(), head
    )
    [grace_event] = explained["customer_profile"]["events"]
    assert grace_event["erased"] == [] and grace_event["personal"]["/name"] == "Grace Hopper"

    # Every number derived without them is unchanged; the projections never held them.
    frame_after = await training_frame(ingest.log, [CUSTOMERS], rows)
    assert frame_after.equals(frame_before)
    assert list(frame_after["customer_profile.segment_lifetime"]) == ["high", "medium"]
    result = await verify(database_url, workers=1)
    assert result["ok"], result["differences"]

    # No clear value of the forgotten fields anywhere: the database, the stream, the spans.
    in_database = b"\n".join(await every_value_in_the_database(ingest.owner))
    on_the_stream = b"\n".join(await published_payloads(nats_server.url, namespace))
    in_spans = "\n".join(span_texts(spans))
    assert "eventlog.group_commit" in in_spans  # the ingest commits were traced meanwhile
    assert on_the_stream.count(b'"$personal"') >= 6  # the sealed fields were published, as ciphertext
    for value in FORGOTTEN_VALUES:
        assert value.encode() not in in_database
        assert value.encode() not in on_the_stream
        assert value not in in_spans
    forgotten = [e for e in await ingest.log.read(0, 1000) if e.type == "subject.forgotten"]
    assert [e.payload for e in forgotten] == [{
        "subject": "customer/cus_000001", "key_id": forgotten[0].payload["key_id"], "requested_by": "privacy-desk",
        "reason": "ticket 42",
    }]  # fmt: skip


async def test_only_ingest_makes_keys_only_it_and_audit_read_them_and_no_service_deletes_one(
    ingest: Ingest, database_url: str
) -> None:
    assert (await ingest.send(ADA)).ok
    for group in dbroles.SERVICE_GROUPS.values():
        pool = await create_pool(database_url, role=group, max_size=1)
        try:
            async with pool.acquire() as conn:
                if group in ("d2d_ingest", "d2d_audit"):
                    assert await conn.fetchval("SELECT count(*) FROM personal_keys") == 1
                else:
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await conn.fetchval("SELECT count(*) FROM personal_keys")
                for change in ("DELETE FROM personal_keys", "UPDATE personal_keys SET key = key"):
                    with pytest.raises(asyncpg.InsufficientPrivilegeError):
                        await conn.execute(change)
        finally:
            await pool.close()


async def test_a_forgotten_key_does_not_linger_in_the_key_tables_files(ingest: Ingest) -> None:
    assert (await ingest.send(ADA)).ok
    async with ingest.owner.acquire() as conn:
        key = await conn.fetchval("SELECT key FROM personal_keys WHERE subject = 'customer/cus_000001'")
        await conn.execute("CHECKPOINT")  # the key is in the table's heap file on disk
        before = await conn.fetchval("SELECT pg_read_binary_file(pg_relation_filepath('personal_keys'))")
    assert key in before
    await forget(ingest.owner, "customer/cus_000001", requested_by="privacy-desk")
    async with ingest.owner.acquire() as conn:
        await conn.execute("CHECKPOINT")
        after = await conn.fetchval("SELECT pg_read_binary_file(pg_relation_filepath('personal_keys'))")
    assert key not in after


async def test_forget_through_the_cli_is_idempotent_and_says_when_a_subject_is_unknown(
    ingest: Ingest, database_url: str, nats_server: NatsServer, namespace: str
) -> None:
    assert (await ingest.send(ADA)).ok
    env = settings_env(database_url, nats_server.url, namespace)
    code, out = await run_cli(env, "forget", "customer/cus_000001", "--requested-by", "privacy-desk")
    assert code == 0 and "forgot customer/cus_000001" in out, out
    code, out = await run_cli(env, "forget", "customer/cus_000001")
    assert code == 0 and "already forgotten" in out, out
    code, out = await run_cli(env, "forget", "customer/cus_999999")
    assert code == 0 and "unknown subject customer/cus_999999" in out, out
    assert [e.type for e in await ingest.log.read(0, 1000, types=["subject.forgotten"])] == ["subject.forgotten"]
    # A later event of the forgotten subject is new data under a new key: readable.
    assert (await ingest.send(ADA)).ok
    newest = (await ingest.log.read(0, 1000, types=["customer.registered"]))[-1]
    [revealed] = await KeyStore(ingest.audit).reveal([(newest.event_id, newest.payload)])
    assert revealed.payload["name"] == "Ada Lovelace" and revealed.erased == ()
