"""`d2d.v1.AccessService`: API keys, created and revoked as events in the log (d2d.auth), hosted
by the registry (the control plane). Admin only (the contract's `allowed_roles`)."""

from __future__ import annotations

import math
from typing import Any

from d2d import auth
from d2d.errors import Refusal
from d2d.eventlog import EventLog
from d2d.ratelimit import Rate
from d2d.v1 import access_pb2

SERVICE_NAME = "d2d.v1.AccessService"
MAX_DISPLAY_NAME = 200


def _caller() -> str:
    principal = auth.current_principal.get()
    return principal.key_id if principal is not None else ""


def _rate(key: Any) -> Rate:
    """The key's rate limit, or Refusal naming the field; a burst of 0 is one second's calls."""
    per_second, burst = key.rate_limit.calls_per_second, key.rate_limit.burst
    if not (math.isfinite(per_second) and per_second > 0):
        message = f"calls per second must be a number above 0, not {per_second}"
        raise Refusal("INVALID_ARGUMENT", message, "api_key.rate_limit.calls_per_second")
    if burst == 0:
        burst = max(1.0, per_second)
    if not (math.isfinite(burst) and burst >= 1):
        raise Refusal("INVALID_ARGUMENT", f"a burst is at least 1 call, not {burst}", "api_key.rate_limit.burst")
    return Rate(per_second, burst)


class AccessApi:
    def __init__(self, event_log: EventLog, keys: auth.KeyRing) -> None:
        self.log = event_log
        self.keys = keys

    async def CreateApiKey(self, request: Any, context: Any) -> access_pb2.CreateApiKeyResponse:
        wanted = request.api_key
        if wanted.role == access_pb2.ROLE_UNSPECIFIED:
            roles = ", ".join(r.upper() for r in auth.ROLES)
            raise Refusal("INVALID_ARGUMENT", f"a key needs a role: one of {roles}", "api_key.role")
        if wanted.role not in access_pb2.Role.values():
            raise Refusal("INVALID_ARGUMENT", f"{wanted.role} is not a Role", "api_key.role")
        if len(wanted.display_name) > MAX_DISPLAY_NAME:
            raise Refusal(
                "INVALID_ARGUMENT", f"at most {MAX_DISPLAY_NAME} characters, not {len(wanted.display_name):,}",
                "api_key.display_name",
            )  # fmt: skip
        rate = _rate(wanted) if wanted.HasField("rate_limit") else None
        text, event = auth.new_key(auth.role_name(wanted.role), wanted.display_name, created_by=_caller(), rate=rate)
        await self.log.append([event])
        await self.keys.refresh()
        created = self.keys.get(event.entity_id)
        assert created is not None
        return access_pb2.CreateApiKeyResponse(api_key=auth.api_key_proto(created), key=text)

    async def ListApiKeys(self, request: Any, context: Any) -> access_pb2.ListApiKeysResponse:
        await self.keys.refresh()
        return access_pb2.ListApiKeysResponse(api_keys=[auth.api_key_proto(k) for k in self.keys.keys()])

    async def RevokeApiKey(self, request: Any, context: Any) -> access_pb2.ApiKey:
        collection, _, key_id = request.name.partition("/")
        if collection != "apiKeys" or not key_id or "/" in key_id:
            raise Refusal("INVALID_ARGUMENT", f"{request.name!r} is not a key name 'apiKeys/{{api_key}}'", "name")
        await self.keys.refresh()
        key = self.keys.get(key_id)
        if key is None:
            raise Refusal("NOT_FOUND", f"no API key {key_id}", "name")
        if not key.revoked:
            await self.log.append([auth.revoke_event(key_id, revoked_by=_caller())])
            await self.keys.refresh()
            key = self.keys.get(key_id)
            assert key is not None
        return auth.api_key_proto(key)
