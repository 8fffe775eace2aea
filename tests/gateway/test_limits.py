"""Token buckets, per-key rate limits and the admission bound (pure)."""

from __future__ import annotations

import pytest
from aegaeon.gateway.limits import Admission, Limit, RateLimiter, TokenBucket


def test_bucket_allows_a_burst_of_its_capacity_then_waits_for_refill():
    bucket = TokenBucket(60, updated=0.0)
    for _ in range(60):
        assert bucket.wait_time(1, 0.0) == 0
        bucket.take(1, 0.0)
    assert bucket.wait_time(1, 0.0) == pytest.approx(1.0)  # 60 per minute: one a second
    assert bucket.wait_time(1, 1.0) == 0


def test_bucket_never_refills_past_capacity():
    bucket = TokenBucket(10, updated=0.0)
    bucket.take(10, 0.0)
    assert bucket.wait_time(10, 3600.0) == 0
    bucket.take(10, 3600.0)
    assert bucket.wait_time(1, 3600.0) > 0


def test_request_larger_than_capacity_passes_only_with_a_full_bucket():
    bucket = TokenBucket(10, updated=0.0)
    assert bucket.wait_time(50, 0.0) == 0
    bucket.take(50, 0.0)
    assert bucket.wait_time(50, 0.0) > 0


def test_rpm_limit_refuses_with_the_wait_and_charges_nothing():
    limiter = RateLimiter()
    limit = Limit(rpm=2)
    assert limiter.acquire("k", limit, 0, 0.0) is None
    assert limiter.acquire("k", limit, 0, 0.0) is None
    wait = limiter.acquire("k", limit, 0, 0.0)
    assert wait == pytest.approx(30.0)
    assert limiter.acquire("k", limit, 0, 30.0) is None


def test_tpm_refusal_does_not_spend_the_request_allowance():
    limiter = RateLimiter()
    limit = Limit(rpm=1, tpm=100)
    assert limiter.acquire("k", limit, 100, 0.0) is None
    assert limiter.acquire("k", Limit(tpm=100), 50, 0.0) is not None
    limiter2 = RateLimiter()
    limiter2.acquire("k", Limit(tpm=10), 10, 0.0)
    assert limiter2.acquire("k", Limit(rpm=5, tpm=10), 10, 0.0) is not None
    assert limiter2.acquire("k", Limit(rpm=5), 0, 0.0) is None  # rpm bucket untouched


def test_refund_returns_unused_tokens():
    limiter = RateLimiter()
    limit = Limit(tpm=100)
    limiter.acquire("k", limit, 100, 0.0)
    assert limiter.acquire("k", limit, 60, 0.0) is not None
    limiter.refund("k", 60, 0.0)
    assert limiter.acquire("k", limit, 60, 0.0) is None


def test_keys_have_separate_buckets_and_no_limit_means_unlimited():
    limiter = RateLimiter()
    assert limiter.acquire("a", Limit(rpm=1), 0, 0.0) is None
    assert limiter.acquire("b", Limit(rpm=1), 0, 0.0) is None
    for _ in range(1000):
        assert limiter.acquire("c", Limit(), 10**6, 0.0) is None


def test_admission_bounds_requests_in_flight():
    admission = Admission(2)
    admission.admit()
    admission.admit()
    assert not admission.can_admit()
    admission.release()
    assert admission.can_admit()
    with pytest.raises(ValueError):
        Admission(0)


def test_admission_bounds_each_key_and_forgets_keys_with_nothing_in_flight():
    admission = Admission(10, per_key=2)
    admission.admit("a")
    admission.admit("a")
    assert "'a'" in (admission.refusal("a") or "")
    assert admission.can_admit("b") and admission.can_admit(None)
    assert admission.can_admit("a", key_cap=3)  # the key's own cap from the keys file
    admission.release("a")
    admission.release("a")
    assert admission.by_key == {} and admission.in_flight == 0


def test_the_request_rate_is_charged_apart_from_the_token_rate():
    limiter = RateLimiter()
    limit = Limit(rpm=1, tpm=10)
    assert limiter.acquire_request("k", limit, 0.0) is None
    assert limiter.acquire_request("k", limit, 0.0) is not None
    assert limiter.acquire_tokens("k", limit, 10, 0.0) is None
    assert limiter.acquire_tokens("k", limit, 1, 0.0) is not None
