"""A registered model version as the log holds it: its `model.registered` event and the bytes of the
content-addressed artifact the event names. Training reads a parent's trees through it (a spec's
`init_model`), and replay the versions it scores with."""

from __future__ import annotations

from d2d.eventlog import EventLog, StoredEvent
from d2d.training.spec import SpecError

PAGE = 20_000


async def registered_version(log: EventLog, name: str) -> tuple[StoredEvent, bytes]:
    """The `model.registered` event of `models/{model}/versions/{n}` and its artifact's bytes;
    NOT_FOUND (SpecError) when the log does not hold it."""
    parts = name.split("/")
    if len(parts) != 4 or parts[0] != "models" or parts[2] != "versions" or not parts[3].isdigit():
        raise SpecError("INVALID_ARGUMENT", f"{name!r} is not 'models/{{model}}/versions/{{n}}'")
    after = 0
    while page := await log.read(after, PAGE, types=["model.registered"]):
        for event in page:
            p = event.payload
            if p.get("model") == parts[1] and p.get("version") == int(parts[3]):
                async with log.pool.acquire() as conn:
                    data = await conn.fetchval("SELECT data FROM artifacts WHERE sha256 = $1", p["sha256"])
                if data is None:
                    raise SpecError("FAILED_PRECONDITION", f"the artifact {p['sha256']} of {name} is not stored")
                return event, bytes(data)
        after = page[-1].seq
    raise SpecError("NOT_FOUND", f"{name} is not registered in the log")
