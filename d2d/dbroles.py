"""Each service's own Postgres login: least privilege, per service.

Migration 0012 grants each service's privileges to its group role (NOLOGIN, `SERVICE_GROUPS`);
this module makes the login roles that are members of them (cluster-wide, with SCRAM passwords),
which migrations cannot do without holding passwords. A login is not a superuser, creates no roles,
and inherits its group's privileges without being able to `SET ROLE` to it or to anyone else.
`d2d up` calls `ensure_logins` after migrating, with the owner's connection, and gives each service
its own `D2D_DATABASE_URL` (`login_url`); the passwords are generated once into a private file of
the data dir (`load_passwords`). Which event types each login may append is `append_rights`
(from the platform contracts' `appended_by`), set by every migration (migration 0014).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from d2d.private import kept_secrets
from d2d.runtime.services import SERVICES

# Service name (d2d.runtime.services) -> its group role (migration 0012 grants to these).
SERVICE_GROUPS: dict[str, str] = {
    "ingest": "d2d_ingest",
    "ingest-relay": "d2d_relay",
    "features": "d2d_features",
    "registry": "d2d_registry",
    "serving": "d2d_serving",
    "feedback": "d2d_feedback",
    "audit": "d2d_audit",
}
assert set(SERVICE_GROUPS) == {spec.name for spec in SERVICES}, "every service needs its database role"

# Audit's verify and replay rebuild state in a scratch database of their own (d2d.replay.scratch).
CREATES_DATABASES = frozenset({"audit"})
LOGINS_FILE = "postgres-logins.json"
SCRAM_ITERATIONS = 4096


def login_role(service: str) -> str:
    """The login role `service` connects as."""
    return f"{SERVICE_GROUPS[service]}_login"


def load_passwords(path: Path) -> dict[str, str]:
    """Each service's password, kept in the private file `path`; generated the first time (and for
    a service added since)."""
    return kept_secrets(path, list(SERVICE_GROUPS))


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The SCRAM-SHA-256 verifier Postgres stores for `password` (RFC 5802/7677): computed here so
    the password itself never reaches the server, its logs or pg_stat_activity."""
    salt = salt or secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = base64.b64encode
    return f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}${b64(stored_key).decode()}:{b64(server_key).decode()}"


async def ensure_logins(owner_url: str, passwords: Mapping[str, str]) -> None:
    """Create or update every service's login role (its password and attributes) and its one
    membership, on the server of `owner_url` (a role that may create roles and grant the groups).
    The database at `owner_url` must be migrated (the groups exist)."""
    conn = await asyncpg.connect(owner_url)
    try:
        # Postgres 16 can grant a membership that inherits privileges but allows no SET ROLE.
        inherit_only = await conn.fetchval("SELECT current_setting('server_version_num')::int >= 160000")
        for service, group in SERVICE_GROUPS.items():
            login = login_role(service)
            createdb = "CREATEDB" if service in CREATES_DATABASES else "NOCREATEDB"
            attributes = (
                f"LOGIN INHERIT NOSUPERUSER NOCREATEROLE {createdb} NOREPLICATION NOBYPASSRLS"
                f" PASSWORD '{scram_verifier(passwords[service])}'"
            )
            async with conn.transaction():
                exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", login)
                await conn.execute(f'{"ALTER" if exists else "CREATE"} ROLE "{login}" WITH {attributes}')
                # Whatever else it was made a member of (by hand, by an older version) goes.
                others = await conn.fetch(
                    "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid"
                    " JOIN pg_roles u ON u.oid = m.member WHERE u.rolname = $1 AND g.rolname <> $2",
                    login,
                    group,
                )
                for other in others:
                    await conn.execute(f'REVOKE "{other["rolname"]}" FROM "{login}" CASCADE')
                options = " WITH INHERIT TRUE, SET FALSE" if inherit_only else ""
                await conn.execute(f'GRANT "{group}" TO "{login}"{options}')
    finally:
        await conn.close()


def append_rights() -> list[tuple[str, str]]:
    """(group, event type) for each platform type and each service its contract lets append it
    ('' for a type only the database's owner appends); any other type is ingest's alone
    (migration 0014's trigger holds every login to these)."""
    from d2d.contracts.platform import APPENDED_BY  # the contracts' loading is not every importer's cost

    return sorted(
        (SERVICE_GROUPS[service], event_type) if service else ("", event_type)
        for event_type, services in APPENDED_BY.items()
        for service in services or ("",)
    )


def append_rights_sql() -> str:
    """The statement making `d2d_append_rights()` list this version's `append_rights()`: run by
    every migration as the owner (`d2d.db.upgrade_to_head`), so a new platform type needs its JSON
    file only."""
    rows = ", ".join(f"('{group}', '{event_type}')" for group, event_type in append_rights())
    return (
        "CREATE OR REPLACE FUNCTION d2d_append_rights() RETURNS TABLE (grp text, type text) LANGUAGE sql"
        f" IMMUTABLE AS $$ VALUES {rows} $$"
    )


def login_url(url: str, service: str, password: str) -> str:
    """`url` (any database URL of the server) logging in as `service`'s login role instead."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(login_role(service), safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))
