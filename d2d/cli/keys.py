"""`d2d keys create|list|revoke`: API keys, through the AccessService the registry hosts (admin only).
`d2d keys bootstrap`: the first admin key where no `d2d up` made one (servers named by D2D_DATABASE_URL,
e.g. docker-compose), appended straight to the log with the database URL's (owner) connection."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from d2d import auth
from d2d.cli import common


def register(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="API keys: create, list, revoke (needs an admin key)")
    ksub = keys.add_subparsers(dest="action", required=True)
    create = ksub.add_parser("create", help="a new key; its text is printed this once")
    create.add_argument("--role", required=True, choices=auth.ROLES)
    create.add_argument("--name", default="", help="what the key is for, e.g. checkout-service")
    create.add_argument(
        "--rate", type=float, default=0, help="calls per second it may make to each service (0: no limit)"
    )
    create.add_argument("--burst", type=float, default=0, help="calls it may make at once (default: one second's)")
    ksub.add_parser("list", help="every key, newest first, revoked ones too")
    revoke = ksub.add_parser("revoke", help="calls with the key are refused from then on")
    revoke.add_argument("key_id", help="the key's id (apiKeys/{id} or the id alone)")
    bootstrap = ksub.add_parser(
        "bootstrap", help="the data dir's admin key, made in the log of D2D_DATABASE_URL if new (no services needed)"
    )
    bootstrap.add_argument("--out", help="the key file to write (default <data dir>/admin.key; 0600)")
    keys.set_defaults(func=cmd_keys)


def cmd_keys(args: argparse.Namespace) -> int:
    from d2d.client import AccessClient

    if args.action == "bootstrap":
        return _bootstrap(args)
    target = common.endpoints(common.settings(args)).addr("registry")

    async def work() -> int:
        async with AccessClient(target) as access:
            if args.action == "create":
                key, text = await access.create_key(args.role, args.name, calls_per_second=args.rate, burst=args.burst)
                common.console.print(f"created {key.name} ({args.role}); its key, shown this once:")
                print(text)
                return 0
            if args.action == "revoke":
                key = await access.revoke_key(args.key_id.removeprefix("apiKeys/"))
                common.console.print(f"revoked {key.name}")
                return 0
            table = Table(title="API keys")
            for col in ("name", "role", "display name", "rate limit", "created", "by", "revoked"):
                table.add_column(col, overflow="fold")
            for key in await access.list_keys():
                revoked = _when(key.revoke_time) if key.HasField("revoke_time") else ""
                limit = key.rate_limit
                rate = f"{limit.calls_per_second:g}/s, {limit.burst:g} at once" if key.HasField("rate_limit") else ""
                table.add_row(
                    key.name, auth.role_name(key.role), key.display_name, rate, _when(key.create_time), key.creator,
                    revoked,
                )  # fmt: skip
            common.console.print(table)
            return 0

    return common.run_rpc(work())


def _when(timestamp: Any) -> str:
    return timestamp.ToDatetime().isoformat(timespec="seconds")


def _bootstrap(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from d2d.private import private_dir

    found = common.settings(args)
    if args.out:
        path = Path(args.out)
    else:
        path = private_dir(found.data_dir) / auth.ADMIN_KEY_FILE

    key_id = auth.key_id_of(asyncio.run(auth.ensure_admin_key_at(found.require_database_url(), path)))
    common.console.print(f"admin key apiKeys/{key_id} is in {path} (private; D2D_API_KEY takes its text)")
    return 0
