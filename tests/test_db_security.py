"""Least privilege in Postgres (issue 15): each service logs in as its own role, which cannot
become anyone else, cannot switch the log's protections off, appends only through
`append_events`, and writes only its own projections and checkpoints; the server wants a password
from everyone, the superuser included.

Each bypass the issue found is tried here as a service login and must be refused."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from d2d import eventlog
from d2d.contracts.platform import APPENDED_BY
from d2d.contracts.registry import ContractRegistry
from d2d.dbroles import SERVICE_GROUPS, login_role, login_url
from d2d.deadletters import DeadLetters, Rejected
from d2d.eventlog import _APPEND_SQL, APPEND_LOCK_KEY, EventLog, NewEvent
from d2d.features.store import Snapshot, load_snapshot, register_views, save_snapshot
from d2d.runtime.servers import PG_DATABASE, PG_USER, EmbeddedPostgres, free_port
from d2d.sim.views import VIEWS
from tests.conftest import service_url

SERVICES = tuple(SERVICE_GROUPS)
APPENDERS = tuple(name for name in SERVICES if name != "audit")

# What each service may change, exactly: (table, privilege). Everything else is refused.
WRITES: dict[str, set[tuple[str, str]]] = {
    "ingest": {
        ("contracts", "INSERT"),
        ("dead_letters", "INSERT"),
        ("dead_letters", "UPDATE"),
        ("personal_keys", "INSERT"),  # a subject's key, made the first time one of its events is personal
    },
    "ingest-relay": {("log_positions", "INSERT"), ("log_positions", "UPDATE")},
    "features": {("feature_views", "INSERT"), ("feature_snapshots", "INSERT"), ("feature_snapshots", "UPDATE")},
    "registry": {
        ("models", "INSERT"),
        ("models", "UPDATE"),
        ("model_versions", "INSERT"),
        ("artifacts", "INSERT"),
        ("model_aliases", "INSERT"),
        ("model_aliases", "UPDATE"),
        ("model_aliases", "DELETE"),
        ("log_positions", "INSERT"),
        ("log_positions", "UPDATE"),
    },  # fmt: skip
    "serving": {("feature_snapshots", "INSERT"), ("feature_snapshots", "UPDATE")},
    "feedback": {
        ("outcome_rules", "INSERT"),
        ("decision_outcomes", "INSERT"),
        ("decision_outcomes", "UPDATE"),
        ("log_positions", "INSERT"),
        ("log_positions", "UPDATE"),
    },  # fmt: skip
    "audit": set(),
}

SET_POSITION = (
    "INSERT INTO log_positions (name, seq) VALUES ($1, $2)"
    " ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, updated_at = now()"
)


def event(i: int) -> NewEvent:
    return NewEvent(uuid.uuid4(), "test.happened", 1, "thing", f"thing_{i}", datetime.now(UTC), f'{{"i": {i}}}')


@pytest.fixture(scope="module")
def unchanged_url(postgres: EmbeddedPostgres) -> str:
    """One migrated database for the tests that are refused everything they try (they change nothing)."""
    url = postgres.create_database(f"t_{uuid.uuid4().hex[:12]}")
    asyncio.run(eventlog.migrate(url))
    return url


@contextlib.asynccontextmanager
async def _as_services(url: str, open_one: Callable[[str], Awaitable[Any]]) -> AsyncIterator:
    """open_as(service) -> `open_one` of `url` as that service's login; all closed on exit."""
    opened = []

    async def open_as(service: str) -> Any:
        opened.append(await open_one(service_url(url, service)))
        return opened[-1]

    try:
        yield open_as
    finally:
        for each in opened:
            await each.close()


@pytest.fixture
async def connect(unchanged_url: str) -> AsyncIterator:
    """connect(service) -> a connection as that service's login, to a database no test changes."""
    async with _as_services(unchanged_url, asyncpg.connect) as open_as:
        yield open_as


@pytest.fixture
async def connect_fresh(database_url: str) -> AsyncIterator:
    """connect_fresh(service) -> a connection as that service's login, to this test's own database."""
    async with _as_services(database_url, asyncpg.connect) as open_as:
        yield open_as


@pytest.fixture
async def pools(database_url: str) -> AsyncIterator:
    """pools(service) -> a pool as that service's login (as the service's own), to this test's database."""
    async with _as_services(database_url, lambda url: eventlog.create_pool(url, max_size=2)) as open_as:
        yield open_as


# ---------------------------------------------------------------------------------------------
# Who a login is, and who it cannot become


@pytest.mark.parametrize("service", SERVICES)
async def test_a_service_login_is_no_superuser_and_cannot_become_another_role(connect, service: str) -> None:
    conn = await connect(service)
    login = login_role(service)
    assert not await conn.fetchval(
        "SELECT rolsuper OR rolcreaterole OR rolbypassrls FROM pg_roles WHERE rolname = $1", login
    )
    await conn.execute("RESET ROLE")  # what undid SET ROLE before: a login has nothing to reset to
    assert await conn.fetchval("SELECT current_user") == login
    for role in (
        PG_USER,
        SERVICE_GROUPS[service],
        "d2d_service",
        "d2d_relay" if service != "ingest-relay" else "d2d_serving",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied to set role"):
            await conn.execute(f'SET ROLE "{role}"')
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await conn.execute("SET SESSION AUTHORIZATION postgres")


@pytest.mark.parametrize("service", SERVICES)
async def test_a_login_is_a_member_of_its_group_only_inheriting_without_set_role(connect, service: str) -> None:
    conn = await connect(service)
    memberships = await conn.fetch(
        "SELECT g.rolname, m.inherit_option, m.set_option, m.admin_option FROM pg_auth_members m"
        " JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = (SELECT oid FROM pg_roles WHERE rolname = current_user)"
    )
    assert [tuple(m.values()) for m in memberships] == [(SERVICE_GROUPS[service], True, False, False)]


async def test_the_superuser_needs_its_password(postgres: EmbeddedPostgres, unchanged_url: str) -> None:
    database_url = unchanged_url
    database = database_url.rsplit("/", 1)[1]
    for password in ("", ":wrong"):
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(f"postgresql://{PG_USER}{password}@127.0.0.1:{postgres.port}/{database}")
    with pytest.raises(asyncpg.InvalidPasswordError):  # a service login too
        await asyncpg.connect(login_url(database_url, "serving", "not-its-password"))
    owner = await asyncpg.connect(database_url)
    try:
        assert await owner.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
    finally:
        await owner.close()


# ---------------------------------------------------------------------------------------------
# The log's protections stay on, and appends go through append_events only


async def test_a_service_cannot_switch_the_append_only_trigger_off(connect) -> None:
    conn = await connect("ingest")
    for statement in (
        "ALTER TABLE events DISABLE TRIGGER events_no_update_delete",
        "ALTER TABLE events DISABLE TRIGGER ALL",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="must be owner"):
            await conn.execute(statement)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="session_replication_role"):
        await conn.execute("SET session_replication_role = replica")


async def test_no_service_inserts_changes_or_removes_events(connect_fresh, pools) -> None:
    log = EventLog(await pools("ingest"))
    await log.append([event(1)])
    forged = (
        "INSERT INTO events (seq, event_id, type, schema_version, entity_type, entity_id, occurred_at, payload)"
        " VALUES (1000, gen_random_uuid(), 'forged', 1, 'thing', 'x', now(), '{}')"
    )
    for service in SERVICES:
        conn = await connect_fresh(service)
        for statement in (forged, "UPDATE events SET type = 'changed'", "DELETE FROM events", "TRUNCATE events"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for table events"):
                await conn.execute(statement)
    assert [r.seq for r in await log.append([event(2)])] == [2]  # the log stays dense
    assert [e.payload for e in await log.read()] == [{"i": 1}, {"i": 2}]


async def append_directly(conn: asyncpg.Connection, event_type: str, entity_id: str = "x") -> int:
    """Call `append_events` as a login can, past EventLog's payload checks: one event of the type."""
    [row] = await conn.fetch(
        _APPEND_SQL, APPEND_LOCK_KEY, [uuid.uuid4()], [event_type], [1], ["thing"], [entity_id],
        [datetime.now(UTC)], ["{}"], ["{}"],
    )  # fmt: skip
    return row["appended_seq"]


# A type each appending service may append (its contract's appended_by; ingest: producers' types).
OWN_TYPE = {
    "ingest": "test.happened",
    "ingest-relay": "quality.alert",
    "features": "feature_view.registered",
    "registry": "model.alias_set",
    "serving": "decision.made",
    "feedback": "outcome.recorded",
}


async def test_appends_through_append_events_from_every_service_get_dense_positions(connect_fresh) -> None:
    seqs = []
    for service in APPENDERS:
        conn = await connect_fresh(service)
        seqs += [await append_directly(conn, OWN_TYPE[service]) for _ in range(2)]
    assert seqs == list(range(1, 2 * len(APPENDERS) + 1))


@pytest.mark.parametrize("service", APPENDERS)
async def test_each_login_appends_only_the_event_types_that_are_its_own(connect, service: str) -> None:
    """A login calling `append_events` itself (as a compromised service could, past every check in
    the code) is held to its contracts' `appended_by`: serving cannot mint an API key or move an
    alias, the registry cannot make decisions, nobody but ingest appends a producer's type."""
    conn = await connect(service)
    for event_type in [*APPENDED_BY, "test.happened"]:
        allowed = service in APPENDED_BY.get(event_type, ("ingest",))
        transaction = conn.transaction()
        await transaction.start()
        try:
            if allowed:
                assert await append_directly(conn, event_type) > 0, event_type
            else:
                with pytest.raises(asyncpg.InsufficientPrivilegeError) as refused:
                    await append_directly(conn, event_type)
                assert f"{SERVICE_GROUPS[service]} may not append {event_type} events" in str(refused.value)
        finally:
            await transaction.rollback()  # the database no test changes stays unchanged


def test_the_rights_that_matter_most_are_declared() -> None:
    """Pinned by hand, so an edit of a contract's appended_by cannot quietly widen them."""
    assert APPENDED_BY["api_key.created"] == APPENDED_BY["api_key.revoked"] == ("registry",)
    assert APPENDED_BY["model.alias_set"] == APPENDED_BY["model.policy_set"] == ("registry",)
    assert APPENDED_BY["decision.made"] == ("serving",)
    assert APPENDED_BY["contract.registered"] == ("ingest",)
    assert APPENDED_BY["subject.forgotten"] == ()  # the owner only (`d2d forget`)


async def test_the_owner_appends_any_type(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        seqs = [await append_directly(conn, t) for t in [*APPENDED_BY, "test.happened"]]
    finally:
        await conn.close()
    assert seqs == list(range(1, len(APPENDED_BY) + 2))


async def test_audit_reads_the_log_but_cannot_append(pools) -> None:
    await EventLog(await pools("ingest")).append([event(1)])
    audit = EventLog(await pools("audit"))
    assert [e.seq for e in await audit.read()] == [1]
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append_events"):
        await audit.append([event(2)])


# ---------------------------------------------------------------------------------------------
# Each service writes its own tables, and only its own rows of the shared ones


@pytest.mark.parametrize("service", SERVICES)
async def test_each_service_may_change_exactly_its_own_tables(connect, service: str) -> None:
    conn = await connect(service)
    granted = await conn.fetch(
        "SELECT t.tablename, p.privilege FROM pg_tables t CROSS JOIN unnest(ARRAY['INSERT', 'UPDATE', 'DELETE',"
        " 'TRUNCATE']) AS p(privilege) WHERE t.schemaname = 'public' AND CASE WHEN p.privilege = 'UPDATE'"
        " THEN has_any_column_privilege(t.tablename, 'UPDATE') ELSE has_table_privilege(t.tablename, p.privilege) END"
    )
    assert {(r["tablename"], r["privilege"]) for r in granted} == WRITES[service]


async def test_another_service_cannot_move_the_relays_position(connect_fresh, pools) -> None:
    relay = await connect_fresh("ingest-relay")
    await relay.execute(SET_POSITION, "relay:D2D_EVENTS", 40)
    await relay.execute(SET_POSITION, "relay:D2D_EVENTS", 41)  # its own row, again
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied for table log_positions"):
        await (await connect_fresh("serving")).execute(SET_POSITION, "relay:D2D_EVENTS", 10**9)
    for service in ("feedback", "registry"):  # they may write positions: their own
        other = await connect_fresh(service)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await other.execute(SET_POSITION, "relay:D2D_EVENTS", 10**9)
        assert await other.execute("UPDATE log_positions SET seq = 1000000000") == "UPDATE 0"
    assert await relay.fetchval("SELECT seq FROM log_positions WHERE name = 'relay:D2D_EVENTS'") == 41
    # ingest reports how far the relay got: it reads the position, and cannot write one
    assert await EventLog(await pools("ingest")).position("relay:D2D_EVENTS") == 41


async def test_a_service_cannot_plant_or_change_another_services_snapshot(pools) -> None:
    features, serving = await pools("features"), await pools("serving")
    mine = Snapshot("features:D2D_EVENTS", 10, 10, {"v": "1"}, b"true state")
    await save_snapshot(features, mine)
    await save_snapshot(features, Snapshot(mine.consumer, 11, 11, mine.views, b"true state"))
    assert await load_snapshot(serving, mine.consumer) is None  # not even visible to serving
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        await save_snapshot(serving, Snapshot(mine.consumer, 10**9, 10**9, mine.views, b"forged state"))
    # planted before features saves its own: features neither loads it nor is overwritten silently
    planted = Snapshot("features:OTHER", 10**9, 10**9, {"v": "1"}, b"forged state")
    await save_snapshot(serving, planted)
    assert await load_snapshot(features, planted.consumer) is None
    kept = await load_snapshot(features, mine.consumer)
    assert kept is not None and (kept.watermark, kept.state) == (11, b"true state")
    await save_snapshot(serving, Snapshot("serving:D2D_EVENTS", 5, 5, {}, b"serving's own"))


async def test_only_the_registry_sets_aliases_and_only_ingest_registers_contracts(connect) -> None:
    for service in SERVICES:
        conn = await connect(service)
        if service != "registry":
            for statement in (
                "DELETE FROM model_aliases",
                "UPDATE model_aliases SET version = version + 1",
                "INSERT INTO model_aliases (model, alias, version, set_seq) VALUES ('fraud', 'production', 9, 1)",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                    await conn.execute(statement)
        if service != "ingest":
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await conn.execute("UPDATE contracts SET compatibility = 'NONE'")


async def test_each_service_records_its_own_facts(pools) -> None:
    ingest = EventLog(await pools("ingest"))
    contract = await ContractRegistry(ingest).register(
        "thing.happened", owner="tests", json_schema={"type": "object"}, compatibility="NONE"
    )
    assert contract.version == 1
    [kept] = await DeadLetters(ingest.pool).keep([Rejected("grpc", b"{not json", "INVALID_ARGUMENT", "bad json")])
    assert kept > 0
    registered = await register_views(EventLog(await pools("features")), VIEWS)
    assert set(registered) == {v.name for v in VIEWS}
    feedback = EventLog(await pools("feedback"))
    async with feedback.pool.acquire() as conn, conn.transaction():
        assert await feedback.lock_position("feedback", conn) == 0
        await feedback.set_position("feedback", 3, conn=conn)
    assert await feedback.position("feedback") == 3


def test_a_data_dir_from_before_passwords_requires_them_from_its_next_start(tmp_path: Path) -> None:
    """A cluster initialised as before (every local connection trusted, no password file) is converted
    when it starts: the superuser gets a generated password and pg_hba trusts no one."""
    server = EmbeddedPostgres(tmp_path / "data", port=free_port(), fsync=False)
    server.pgdata.mkdir(parents=True)
    server._prepare_user()  # as root, the server's own user runs initdb, as start() would
    subprocess.run(
        [str(server.bin_dir / "initdb"), "-D", str(server.pgdata), "-U", PG_USER, "--auth=trust", "--no-sync"],
        check=True, capture_output=True, **server._run_as(),
    )  # fmt: skip
    assert not server.password_file.exists()
    server.start()
    try:

        async def logins() -> None:
            with pytest.raises(asyncpg.InvalidPasswordError):
                await asyncpg.connect(f"postgresql://{PG_USER}@127.0.0.1:{server.port}/{PG_DATABASE}")
            conn = await asyncpg.connect(server.url)
            await conn.close()

        asyncio.run(logins())
    finally:
        server.stop()
    assert server.password_file.stat().st_mode & 0o777 == 0o600
    assert "trust" not in (server.pgdata / "pg_hba.conf").read_text()


async def test_a_service_login_is_told_to_migrate_as_the_owner_on_a_database_behind(postgres: EmbeddedPostgres) -> None:
    url = await asyncio.to_thread(postgres.create_database, f"t_{uuid.uuid4().hex[:12]}")
    with pytest.raises(RuntimeError, match="run `d2d migrate`"):
        await eventlog.migrate(service_url(url, "serving"))
    assert await eventlog.migrate(url)  # the owner may
    assert await eventlog.migrate(service_url(url, "serving")) == []  # at the newest: nothing to change
