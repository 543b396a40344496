"""Rate limits per API key: a token bucket per key, checked before a call runs.

A key created with a rate (calls per second, `burst` calls at once) may make that many calls to
each service process; one over it is refused with RESOURCE_EXHAUSTED and `google.rpc.RetryInfo`
saying when a call will be taken again, so a well-behaved client backs off exactly that long. A
key with no rate is not limited (the platform's own service key, an operator's). The bucket lives
in the process that serves the call: with N replicas of a service a key gets N times its rate there.
The clock is passed in, so the arithmetic is tested without waiting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from d2d.errors import Refusal

_EPSILON = 1e-9


@dataclass(frozen=True)
class Rate:
    """`per_second` calls a second on average, up to `burst` at once (at least 1)."""

    per_second: float
    burst: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.per_second) and self.per_second > 0):
            raise ValueError(f"a rate must be a positive number of calls per second, not {self.per_second}")
        if not (math.isfinite(self.burst) and self.burst >= 1):
            raise ValueError(f"a burst must be at least 1 call, not {self.burst}")


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """One bucket per key id; `take` spends a call or says how long to wait."""

    def __init__(self) -> None:
        self._buckets: dict[str, _Bucket] = {}

    def wait_needed(self, key_id: str, rate: Rate | None, now: float) -> float:
        """0 if the call may run now (and it is counted), else the seconds until one may."""
        if rate is None:
            return 0.0
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = _Bucket(rate.burst, now)
        else:
            bucket.tokens = min(rate.burst, bucket.tokens + max(0.0, now - bucket.at) * rate.per_second)
            bucket.at = now
        if bucket.tokens >= 1 - _EPSILON:  # a wait of exactly the time given is enough despite rounding
            bucket.tokens = max(0.0, bucket.tokens - 1)
            return 0.0
        return (1 - bucket.tokens) / rate.per_second

    def take(self, key_id: str, rate: Rate | None, now: float) -> None:
        """Count a call of `key_id`, or refuse it with RESOURCE_EXHAUSTED and when to retry."""
        wait = self.wait_needed(key_id, rate, now)
        if wait > 0:
            assert rate is not None
            raise Refusal(
                "RESOURCE_EXHAUSTED",
                f"API key {key_id} is limited to {rate.per_second:g} calls per second (bursts of {rate.burst:g});"
                f" retry in {wait:.3f} s",
                retry_after=wait,
            )

    def forget(self, key_id: str) -> None:
        """Drop a revoked key's bucket."""
        self._buckets.pop(key_id, None)
