"""`d2d migrate`: apply the database migrations (the one command besides `up` that needs the database).

`d2d migrate --credentials DIR` then gives every service its own credentials where `d2d up` does not
run them (docker-compose's one-shot `init`), as `d2d up` does: the Postgres login roles of
`d2d.dbroles`, NATS users with the permissions of `d2d.bus.permissions`, and the first admin key.
Secrets are generated once and kept in DIR, so running it again (every `docker compose up`) changes
nothing but what is missing. DIR then holds, each file owner-only:

  nats/users.conf        the NATS servers' `authorization` block (each server's config includes it)
  nats/routes.conf       with --nats-routes: inside each server's `cluster` block, the routes to the
                         cluster's members and the credentials they route with (no other server may)
  <service>/env          what that service sources before it starts: `export D2D_DATABASE_URL=...`
                         (its own login), `D2D_NATS_URL` (its NATS user, on every server of
                         D2D_NATS_URL's comma-separated list) and `D2D_API_KEY` (the admin key)
  admin.key              the admin key, for the CLI and clients
  postgres-logins.json, nats-users.json   the kept passwords
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from d2d.cli.common import console, endpoints, settings
from d2d.config import Settings

NATS_USERS_CONF = Path("nats") / "users.conf"
NATS_ROUTES_CONF = Path("nats") / "routes.conf"
NATS_ROUTE_SECRET = "cluster routes"  # its password's name among the kept NATS passwords
SERVICE_ENV = "env"


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("migrate", help="apply database migrations")
    parser.add_argument(
        "--credentials",
        metavar="DIR",
        help="then make each service's Postgres login, NATS user and the admin key, written under DIR"
        " (docker-compose's init; D2D_DATABASE_URL must be the owner's, D2D_NATS_URL lists the NATS servers)",
    )
    parser.add_argument(
        "--nats-routes",
        metavar="URLS",
        help="with --credentials: the NATS cluster's route URLs (comma-separated nats://host:port), for routes.conf",
    )
    parser.set_defaults(func=cmd_migrate)


def cmd_migrate(args: argparse.Namespace) -> int:
    from d2d import eventlog

    found = settings(args)
    database_url = endpoints(found).database_url
    applied = asyncio.run(eventlog.migrate(database_url))
    console.print(f"applied: {', '.join(applied) or 'nothing (up to date)'}")
    if args.credentials:
        routes = [route.strip() for route in (args.nats_routes or "").split(",") if route.strip()]
        written = write_credentials(Path(args.credentials), database_url, found.require_nats_url(), found, routes)
        console.print(f"credentials of {', '.join(written)} in {args.credentials}")
    return 0


def write_credentials(
    directory: Path, owner_url: str, nats_urls: str, found: Settings, routes: Sequence[str] = ()
) -> list[str]:
    """Make every service's login role (with the owner's connection at `owner_url`, migrated), the
    NATS users' config (and the cluster's, given its `routes`) and the admin key; write each
    service's environment file. The services named."""
    from d2d import auth, bus, dbroles
    from d2d.private import kept_secrets, private_dir, write_private_text
    from d2d.runtime.servers import NATS_USERS_FILE, nats_authorization, nats_cluster_routes

    private_dir(directory)
    db_passwords = dbroles.load_passwords(directory / dbroles.LOGINS_FILE)
    asyncio.run(dbroles.ensure_logins(owner_url, db_passwords))
    admin_key = asyncio.run(auth.ensure_admin_key_at(owner_url, directory / auth.ADMIN_KEY_FILE))
    users = bus.permissions(
        bus.Topology(found.nats_namespace),
        features_consumer=found.features_consumer, serving_consumer=found.serving_consumer,
    )  # fmt: skip
    nats_passwords = kept_secrets(directory / NATS_USERS_FILE, [*users, NATS_ROUTE_SECRET], nbytes=24)
    private_dir(directory / NATS_USERS_CONF.parent)
    write_private_text(directory / NATS_USERS_CONF, nats_authorization(users, nats_passwords) + "\n")
    if routes:
        write_private_text(
            directory / NATS_ROUTES_CONF, nats_cluster_routes(nats_passwords[NATS_ROUTE_SECRET], routes) + "\n"
        )
    for service in dbroles.SERVICE_GROUPS:
        env = {"D2D_DATABASE_URL": dbroles.login_url(owner_url, service, db_passwords[service])}
        if service in bus.SERVICE_USERS:
            user = bus.SERVICE_USERS[service]
            env["D2D_NATS_URL"] = nats_urls_as(nats_urls, user, nats_passwords[user])
        env["D2D_API_KEY"] = admin_key
        lines = [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
        write_private_text(private_dir(directory / service) / SERVICE_ENV, "\n".join(lines) + "\n")
    return list(dbroles.SERVICE_GROUPS)


def nats_urls_as(urls: str, user: str, password: str) -> str:
    """Each server of the comma-separated `urls` with `user`'s credentials, in the same order."""
    from d2d import bus

    with_user = []
    for url in bus.servers(urls):
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        with_user.append(urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}")))
    return ",".join(with_user)
