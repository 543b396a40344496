"""Rate limits per API key (d2d.ratelimit): the token bucket's arithmetic, on a clock the test moves."""

from __future__ import annotations

import pytest

from d2d.errors import Refusal
from d2d.ratelimit import Rate, RateLimiter


def test_a_burst_passes_then_calls_are_refused_with_the_exact_wait() -> None:
    limiter, rate = RateLimiter(), Rate(per_second=10, burst=3)
    for _ in range(3):
        limiter.take("k1", rate, now=100.0)
    with pytest.raises(Refusal) as refused:
        limiter.take("k1", rate, now=100.0)
    assert refused.value.code == "RESOURCE_EXHAUSTED"
    assert refused.value.retry_after == pytest.approx(0.1)
    assert "k1" in refused.value.message and "10 calls per second" in refused.value.message
    with pytest.raises(Refusal) as again:  # 40 ms later, 60 ms are still to wait
        limiter.take("k1", rate, now=100.04)
    assert again.value.retry_after == pytest.approx(0.06)
    limiter.take("k1", rate, now=100.1)  # the wait it was told: one call is taken


def test_over_a_long_run_a_key_gets_its_rate_plus_one_burst() -> None:
    limiter, rate = RateLimiter(), Rate(per_second=50, burst=5)
    taken = 0
    for ms in range(10_000):  # a call every millisecond for 10 s
        if limiter.wait_needed("k", rate, now=ms / 1000) == 0:
            taken += 1
    assert taken == 5 + 50 * 10 - 1 or taken == 5 + 50 * 10  # the last refill may land on the last tick


def test_keys_are_limited_apart_and_a_key_without_a_rate_is_not_limited() -> None:
    limiter, rate = RateLimiter(), Rate(per_second=1, burst=1)
    limiter.take("a", rate, now=0.0)
    limiter.take("b", rate, now=0.0)  # b has its own bucket
    with pytest.raises(Refusal):
        limiter.take("a", rate, now=0.0)
    for _ in range(1000):
        limiter.take("service", None, now=0.0)


def test_a_forgotten_key_starts_a_full_bucket_again() -> None:
    limiter, rate = RateLimiter(), Rate(per_second=1, burst=2)
    limiter.take("k", rate, now=0.0)
    limiter.take("k", rate, now=0.0)
    limiter.forget("k")
    limiter.take("k", rate, now=0.0)


@pytest.mark.parametrize(("per_second", "burst"), [(0, 1), (-1, 1), (float("nan"), 1), (float("inf"), 1), (1, 0.5)])
def test_nonsense_rates_are_refused(per_second: float, burst: float) -> None:
    with pytest.raises(ValueError):
        Rate(per_second, burst)
