"""API keys and roles on every gRPC method, against the real services (all in this process, started
once for the module): every RPC of every service x {no key, each role} gives the contract's answer;
keys created through the AccessService work at once, revoked ones stop; health needs no key; the
secret is never stored or traced; privileged changes record who made them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from d2d import auth, eventlog, grpcserver
from d2d.client import AccessClient, IngestClient, RegistryClient, error_details
from d2d.config import Settings
from d2d.eventlog import NewEvent, StoredEvent
from d2d.runtime.servers import EmbeddedPostgres, NatsServer, free_port
from d2d.sim import load_contracts
from d2d.v1 import access_pb2, audit_pb2, features_pb2, feedback_pb2, ingest_pb2, registry_pb2, serving_pb2
from tests.conftest import TEST_API_KEY, run_cli, seed_test_key, wait_healthy

MODULES = (ingest_pb2, features_pb2, registry_pb2, serving_pb2, feedback_pb2, audit_pb2, access_pb2)
# The process hosting each service (the registry hosts the AccessService).
HOST = {
    "d2d.v1.IngestService": "ingest", "d2d.v1.FeatureService": "features", "d2d.v1.RegistryService": "registry",
    "d2d.v1.AccessService": "registry", "d2d.v1.ServingService": "serving", "d2d.v1.FeedbackService": "feedback",
    "d2d.v1.AuditService": "audit",
}  # fmt: skip
METHODS = [m for module in MODULES for s in module.DESCRIPTOR.services_by_name.values() for m in s.methods]
DENIED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


@dataclass
class Platform:
    addrs: dict[str, str]
    database_url: str
    keys: dict[str, str]  # role -> key text, made through the AccessService
    admin_key_id: str


@pytest.fixture(scope="module")
async def platform(
    postgres: EmbeddedPostgres, nats_server: NatsServer, namespace_for_module: str, spans: object
) -> AsyncIterator[Platform]:
    from services.audit.server import serve as serve_audit
    from services.features.server import serve as serve_features
    from services.feedback.server import serve as serve_feedback
    from services.ingest.server import relay
    from services.ingest.server import serve as serve_ingest
    from services.registry.server import serve as serve_registry
    from services.serving.server import serve as serve_serving

    url = await asyncio.to_thread(postgres.create_database, f"auth_{namespace_for_module}")
    await eventlog.migrate(url)
    await seed_test_key(url)
    names = ("ingest", "features", "registry", "serving", "feedback", "audit")
    addrs = {name: f"127.0.0.1:{free_port()}" for name in names}
    settings = Settings(
        database_url=url, nats_url=nats_server.url, nats_namespace=namespace_for_module, addrs=addrs,
        registry_retrain_loop=False,
    )  # fmt: skip
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(serve(settings, stop))
        for serve in (serve_ingest, relay, serve_features, serve_registry, serve_serving, serve_feedback, serve_audit)
    ]
    try:
        for addr in addrs.values():
            await wait_healthy(addr, tasks)
        keys = {}
        async with AccessClient(addrs["registry"], api_key=TEST_API_KEY) as access:
            for role in auth.ROLES:
                _, keys[role] = await access.create_key(role, f"test {role}")
        yield Platform(addrs, url, keys, auth.key_id_of(TEST_API_KEY))
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)


@pytest.fixture(scope="module")
def namespace_for_module() -> str:
    import uuid

    return f"t{uuid.uuid4().hex[:10]}"


async def call(addr: str, method: MethodDescriptor, api_key: str) -> grpc.StatusCode:
    """Call `method` with an empty request and `api_key` ('' for none): the status it ends with."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request_type = message_factory.GetMessageClass(method.input_type)
    response_type = message_factory.GetMessageClass(method.output_type)
    codec = {"request_serializer": request_type.SerializeToString, "response_deserializer": response_type.FromString}
    async with grpcserver.channel(addr, api_key=api_key) as channel:
        try:
            if method.client_streaming:

                async def one() -> AsyncIterator[object]:
                    yield request_type()

                await channel.stream_unary(path, **codec)(one(), timeout=30)
            elif method.server_streaming:
                async for _ in channel.unary_stream(path, **codec)(request_type(), timeout=30):
                    break
            else:
                await channel.unary_unary(path, **codec)(request_type(), timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name.removeprefix("d2d.v1."))
async def test_every_rpc_answers_each_role_as_its_contract_says(platform: Platform, method: MethodDescriptor) -> None:
    addr = platform.addrs[HOST[method.containing_service.full_name]]
    allowed = auth.roles_of(method)
    wrong = []
    if (code := await call(addr, method, "")) != grpc.StatusCode.UNAUTHENTICATED:
        wrong.append(f"no key: {code.name}")
    for role in auth.ROLES:
        code = await call(addr, method, platform.keys[role])
        if role in allowed and code in DENIED:
            wrong.append(f"{role} (allowed): {code.name}")
        if role not in allowed and code != grpc.StatusCode.PERMISSION_DENIED:
            wrong.append(f"{role} (not allowed): {code.name}")
    assert wrong == [], f"{method.full_name} allows {sorted(allowed)}"


# The attacks of issue 15, spelled out: what only an operator (or admin) may do.
OPERATOR_ONLY = [
    registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].methods_by_name["SetAlias"],
    registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].methods_by_name["RegisterModelVersion"],
    ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].methods_by_name["CreateContractVersion"],
    ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].methods_by_name["ListDeadLetters"],
    ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].methods_by_name["RedriveDeadLetters"],
]


@pytest.mark.parametrize("method", OPERATOR_ONLY, ids=lambda m: m.name)
async def test_only_an_operator_moves_aliases_registers_contracts_and_reads_dead_letters(
    platform: Platform, method: MethodDescriptor
) -> None:
    addr = platform.addrs[HOST[method.containing_service.full_name]]
    assert await call(addr, method, "") == grpc.StatusCode.UNAUTHENTICATED
    for role in ("producer", "app", "auditor"):
        assert await call(addr, method, platform.keys[role]) == grpc.StatusCode.PERMISSION_DENIED, role
    for role in ("operator", "admin"):
        assert await call(addr, method, platform.keys[role]) not in DENIED, role


async def test_a_wrong_role_is_told_the_role_needed_and_its_own(platform: Platform) -> None:
    app_key = platform.keys["app"]
    async with RegistryClient(platform.addrs["registry"], api_key=app_key) as registry:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await registry.set_alias("fraud", "production", 1)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    message = denied.value.details()
    assert "SetAlias" in message and "needs role operator" in message and "has role app" in message
    [info] = [d for d in error_details(denied.value) if isinstance(d, error_details_pb2.ErrorInfo)]
    assert info.reason == "ROLE_NOT_ALLOWED" and info.metadata["key_role"] == "app"
    assert "operator" in info.metadata["required_roles"].split(",")


async def test_no_key_or_a_wrong_secret_is_unauthenticated_and_never_echoed(platform: Platform) -> None:
    operator = platform.keys["operator"]
    forged = operator[: operator.rindex("_") + 1] + "not-the-secret"
    for key, reason in (("", "API_KEY_MISSING"), (forged, "API_KEY_WRONG_SECRET"), ("hello", "API_KEY_MALFORMED")):
        async with IngestClient(platform.addrs["ingest"], api_key=key) as ingest:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ingest.get_event_log()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, key
        assert "not-the-secret" not in refused.value.details() and operator not in refused.value.details()
        [info] = [d for d in error_details(refused.value) if isinstance(d, error_details_pb2.ErrorInfo)]
        assert info.reason == reason


async def test_a_created_key_works_at_once_everywhere_and_a_revoked_one_stops(platform: Platform) -> None:
    async with AccessClient(platform.addrs["registry"], api_key=TEST_API_KEY) as access:
        created, text = await access.create_key("operator", "short-lived")
        async with IngestClient(platform.addrs["ingest"], api_key=text) as ingest:
            await ingest.get_event_log()  # another process's ring learns the key on first sight
            revoked = await access.revoke_key(auth.key_id_of(text))
            assert revoked.HasField("revoke_time") and revoked.revoker == f"apiKeys/{platform.admin_key_id}"
            async with RegistryClient(platform.addrs["registry"], api_key=text) as registry:
                with pytest.raises(grpc.aio.AioRpcError) as at_once:  # the registry revoked it: at once there
                    await registry.list_models()
            assert at_once.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in at_once.value.details()
            for _ in range(100):  # elsewhere within the ring's refresh (about 2 s)
                try:
                    await ingest.get_event_log()
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("a revoked key kept working on ingest")
        listed = {k.name: k for k in await access.list_keys()}
    assert listed[created.name].HasField("revoke_time") and listed[created.name].role == access_pb2.OPERATOR


async def test_a_rate_limited_key_is_refused_over_its_rate_with_when_to_retry(platform: Platform) -> None:
    async with AccessClient(platform.addrs["registry"], api_key=TEST_API_KEY) as access:
        created, limited = await access.create_key("operator", "throttled", calls_per_second=0.05, burst=2)
        assert (created.rate_limit.calls_per_second, created.rate_limit.burst) == (0.05, 2)
        with pytest.raises(grpc.aio.AioRpcError) as nonsense:
            await access.create_key("operator", "bad", calls_per_second=-1)
        assert nonsense.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "rate_limit.calls_per_second" in str(error_details(nonsense.value))
    async with IngestClient(platform.addrs["ingest"], api_key=limited) as ingest:
        await ingest.get_event_log()
        await ingest.get_event_log()  # the burst: two calls at once
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # the next in 20 s
            await ingest.get_event_log()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert auth.key_id_of(limited) in refused.value.details() and limited not in refused.value.details()
        [retry] = [d for d in error_details(refused.value) if isinstance(d, error_details_pb2.RetryInfo)]
        assert 10 < retry.retry_delay.ToTimedelta().total_seconds() <= 20
    async with IngestClient(platform.addrs["ingest"], api_key=platform.keys["operator"]) as other:
        for _ in range(5):  # another key is not held back by it
            await other.get_event_log()


@pytest.mark.parametrize("path", ["/d2d.v1.ServingService/Predict", "/d2d.v1.RegistryService/GetArtifact"])
async def test_malformed_bytes_without_a_key_learn_nothing_but_that_a_key_is_needed(
    platform: Platform, path: str
) -> None:
    addr = platform.addrs[path.split("/")[1].removeprefix("d2d.v1.").removesuffix("Service").lower()]
    raw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
    streaming = path.endswith("GetArtifact")  # answers a stream
    answers = {}
    for who, key in (("nobody", ""), ("admin", TEST_API_KEY)):
        async with grpcserver.channel(addr, api_key=key) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                if streaming:
                    async for _ in channel.unary_stream(path, **raw)(b"\xff\xff\xff\xff", timeout=10):
                        break
                else:
                    await channel.unary_unary(path, **raw)(b"\xff\xff\xff\xff", timeout=10)
        answers[who] = (caught.value.code(), caught.value.details())
    assert answers["nobody"][0] == grpc.StatusCode.UNAUTHENTICATED
    assert "not a valid" not in answers["nobody"][1]
    assert answers["admin"][0] == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in answers["admin"][1]


async def test_health_needs_no_key_on_any_service(platform: Platform) -> None:
    for name, addr in platform.addrs.items():
        async with grpcserver.channel(addr, api_key="") as anonymous:
            reply = await health_pb2_grpc.HealthStub(anonymous).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name


async def test_privileged_changes_record_who_made_them_and_no_secret_is_stored(platform: Platform) -> None:
    operator = platform.keys["operator"]
    async with RegistryClient(platform.addrs["registry"], api_key=operator) as registry:
        await registry.create_model("audited")
        await registry.set_policy("audited", threshold=0.7)
    spec = next(c for c in load_contracts() if c.event_type == "merchant.onboarded")
    async with IngestClient(platform.addrs["ingest"], api_key=operator) as ingest:
        await ingest.create_contract_version(spec.event_type, owner=spec.owner, json_schema=spec.schema)
    conn = await asyncpg.connect(platform.database_url)
    try:
        rows = await conn.fetch("SELECT type, entity_id, payload::text AS p, metadata::text AS m FROM events")
    finally:
        await conn.close()
    actors = {(r["type"], r["entity_id"]): json.loads(r["m"]).get("actor") for r in rows}
    operator_id = auth.key_id_of(operator)
    assert actors[("model.registered", "audited")] == operator_id
    assert actors[("model.policy_set", "audited")] == operator_id
    assert actors[("contract.registered", "merchant.onboarded")] == operator_id
    assert actors[("api_key.created", operator_id)] == platform.admin_key_id
    stored = "\n".join(r["p"] + r["m"] for r in rows)
    assert not [secret for secret in secrets_of(platform) if secret in stored]


def secrets_of(platform: Platform) -> list[str]:
    """The secret part (after `d2d_<key id>_`) of every key the tests hold."""
    return [text.split("_", 2)[2] for text in [TEST_API_KEY, *platform.keys.values()]]


async def test_spans_name_the_caller_and_never_carry_the_secret(platform: Platform, spans) -> None:  # noqa: ANN001
    auditor = platform.keys["auditor"]
    async with IngestClient(platform.addrs["ingest"], api_key=auditor) as ingest:
        await ingest.get_event_log()
    finished = spans.get_finished_spans()
    served = [s for s in finished if s.name == "/d2d.v1.IngestService/GetEventLog" and s.kind.name == "SERVER"]
    assert any(
        s.attributes.get("d2d.api_key.id") == auth.key_id_of(auditor) and s.attributes.get("d2d.api_key.role")
        == "auditor" for s in served
    )  # fmt: skip
    secrets = [
        text[text.index("_", len(auth.KEY_PREFIX) + 1) + 1 :] for text in [TEST_API_KEY, *platform.keys.values()]
    ]
    dumped = "\n".join(s.to_json() for s in finished)
    assert not [secret for secret in secrets if secret in dumped]


async def test_a_method_without_allowed_roles_cannot_be_served() -> None:
    """A server refuses, at start, a service with a method that does not say who may call it."""
    health = health_pb2.DESCRIPTOR.services_by_name["Health"]
    server, _ = grpcserver.new_server([health.full_name])
    with pytest.raises(ValueError, match=r"grpc\.health\.v1\.Health\.Check declares no allowed_roles"):
        grpcserver.add_service(server, health, object(), auth.KeyRing(None))


async def test_keys_commands_create_list_and_revoke(platform: Platform, tmp_path) -> None:  # noqa: ANN001
    env = {
        "D2D_DATABASE_URL": platform.database_url, "D2D_NATS_URL": "nats://unused", "D2D_DATA_DIR": str(tmp_path),
        "D2D_REGISTRY_ADDR": platform.addrs["registry"],
    }  # fmt: skip
    code, out = await run_cli(env, "keys", "create", "--role", "producer", "--name", "checkout")
    assert code == 0, out
    [text] = [line.strip() for line in out.splitlines() if auth.key_id_of(line.strip())]
    key_id = auth.key_id_of(text)
    append = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"].methods_by_name["AppendEvents"]
    assert await call(platform.addrs["ingest"], append, text) not in DENIED
    code, out = await run_cli(env, "keys", "list")
    assert code == 0 and f"apiKeys/{key_id}" in out and "checkout" in out and "producer" in out, out
    assert text.split("_", 2)[2] not in out
    code, out = await run_cli({**env, "D2D_API_KEY": platform.keys["operator"]}, "keys", "list")
    assert code == 1 and "PERMISSION_DENIED" in out and "needs role admin" in out, out
    code, out = await run_cli(env, "keys", "revoke", key_id)
    assert code == 0 and f"revoked apiKeys/{key_id}" in out, out


async def test_keys_bootstrap_makes_a_working_admin_key_once(platform: Platform, tmp_path) -> None:  # noqa: ANN001
    """Where no `d2d up` made one (servers named by the environment), the first admin key comes
    straight from the log's owner connection."""
    env = {"D2D_DATABASE_URL": platform.database_url, "D2D_NATS_URL": "nats://unused", "D2D_API_KEY": ""}
    key_file = tmp_path / "admin.key"
    code, out = await run_cli(env, "keys", "bootstrap", "--out", str(key_file))
    assert code == 0, out
    text = auth.read_key_file(key_file)
    assert key_file.stat().st_mode & 0o777 == 0o600 and text not in out
    create = access_pb2.DESCRIPTOR.services_by_name["AccessService"].methods_by_name["CreateApiKey"]
    assert await call(platform.addrs["registry"], create, text) == grpc.StatusCode.INVALID_ARGUMENT  # no role given
    code, out = await run_cli(env, "keys", "bootstrap", "--out", str(key_file))
    assert code == 0 and auth.read_key_file(key_file) == text, out


def stored(event: NewEvent, seq: int) -> StoredEvent:
    return StoredEvent(seq, event.event_id, event.type, 1, event.entity_type, event.entity_id, event.occurred_at,
                       event.occurred_at, json.loads(event.payload), event.metadata)  # fmt: skip


def test_a_revocation_read_before_its_keys_creation_still_revokes_it() -> None:
    """The ring reads creations, then revocations: a key created and revoked between the two reads
    comes to it revocation first."""
    text, created = auth.new_key("app")
    ring = auth.KeyRing(None)
    ring.fold(stored(auth.revoke_event(auth.key_id_of(text), revoked_by="someone"), 2))
    ring.fold(stored(created, 1))
    with pytest.raises(auth.Unauthenticated, match="revoked"):
        ring.check(text)
    fresh_text, fresh = auth.new_key("app")
    ring.fold(stored(fresh, 3))
    assert ring.check(fresh_text) == auth.Principal(auth.key_id_of(fresh_text), "app")
