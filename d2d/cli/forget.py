"""`d2d forget SUBJECT`: forget a data subject by destroying its personal data key (crypto-shredding).

Like `migrate`, it talks to the database as its owner (the only role that may delete a key), not to a
service: the key is deleted and `subject.forgotten` appended in one transaction (d2d.personal.forget).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass

from d2d.cli.common import console, endpoints, settings


def register(sub: argparse._SubParsersAction) -> None:
    forget = sub.add_parser("forget", help="forget a data subject: its personal fields read as erased from now on")
    forget.add_argument("subject", help="the subject, '<entity_type>/<entity_id>', e.g. customer/cus_000123")
    forget.add_argument("--requested-by", default="", help="who asked (default: this user's login name)")
    forget.add_argument("--reason", default="", help="why, e.g. the request's reference (no personal data)")
    forget.set_defaults(func=cmd_forget)


def cmd_forget(args: argparse.Namespace) -> int:
    from d2d import eventlog
    from d2d.errors import Refusal
    from d2d.personal import forget

    async def run() -> int:
        pool = await eventlog.create_pool(endpoints(settings(args)).database_url, max_size=1)
        try:
            done = await forget(pool, args.subject, requested_by=args.requested_by or getpass.getuser(),
                                reason=args.reason)  # fmt: skip
        except Refusal as exc:
            console.print(f"[red]{exc.code}[/red]: {exc.message}")
            return 2
        finally:
            await pool.close()
        if done.seq:
            console.print(f"forgot {done.subject}: its key is destroyed (subject.forgotten at log seq {done.seq})")
        elif done.earlier_seq:
            console.print(f"{done.subject} was already forgotten (subject.forgotten at log seq {done.earlier_seq})")
        else:
            console.print(f"unknown subject {done.subject}: no personal data is stored for it; nothing to forget")
        return 0

    return asyncio.run(run())
