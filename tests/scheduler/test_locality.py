"""The live scheduler's locality hint: the model-stores' heartbeats become what each node caches
(``locality.py``, pure), and the service gives it to the policy with each worker's node.
The service tests use real NATS and Redis with fake workers (``test_service``'s harness) and a
store heartbeat published by the test."""

from __future__ import annotations

import time

import pytest
from aegaeon.scheduler.books import instance_view
from aegaeon.scheduler.locality import STALE_BEATS, NodeCaches
from aegaeon.scheduler.policies.base import ModelSpec
from scheduler_harness import harness, wait_for

from aegaeon.protocol import AssignRequest, Heartbeat, StoreHeartbeat

__all__ = ["harness"]  # the fixture, imported for pytest

GB = 10**9
MODELS = {"a": ModelSpec("a", 4 * GB, 256, 64), "b": ModelSpec("b", 1 * GB, 256, 64)}


def beat(store_id: str, node: str, cached: list[str], interval_s: float = 1.0) -> StoreHeartbeat:
    return StoreHeartbeat(store_id, node, time.time(), cached=cached, interval_s=interval_s)


# ---------------------------------------------------------------------- the pure hint


def test_a_model_cached_on_a_node_costs_no_fetch_there_and_its_bytes_elsewhere():
    caches = NodeCaches(MODELS, fetch_bytes_per_s=2 * GB)
    caches.heard(beat("s-a", "node-a", ["a"]), now=0.0)
    caches.heard(beat("s-b", "node-b", ["b"]), now=0.0)
    assert caches.fetch_s("node-a", "a") == 0.0
    assert caches.fetch_s("node-b", "a") == pytest.approx(2.0)
    assert caches.fetch_s("node-a", "b") == pytest.approx(0.5)
    assert caches.fetch_s("node-c", "b") == pytest.approx(0.5)  # no store heard there


def test_a_stores_newer_heartbeat_replaces_what_it_said_before():
    caches = NodeCaches(MODELS)
    caches.heard(beat("s-a", "node-a", ["a"]), now=0.0)
    caches.heard(beat("s-a", "node-a", ["b"]), now=1.0)
    assert caches.cached_on("node-a") == {"b"}


def test_two_stores_on_one_node_count_together():
    caches = NodeCaches(MODELS)
    caches.heard(beat("s-1", "node-a", ["a"]), now=0.0)
    caches.heard(beat("s-2", "node-a", ["b"]), now=0.0)
    assert caches.cached_on("node-a") == {"a", "b"}


def test_a_store_silent_for_a_few_beats_is_forgotten():
    caches = NodeCaches(MODELS)
    caches.heard(beat("s-a", "node-a", ["a"], interval_s=0.5), now=10.0)
    assert caches.expire(now=10.0 + STALE_BEATS * 0.5 - 0.01) == [] and caches.known
    assert caches.expire(now=10.0 + STALE_BEATS * 0.5) == ["s-a"]
    assert not caches.known and caches.cached_on("node-a") == frozenset()
    assert caches.fetch_s("node-a", "a") == pytest.approx(2.0)


def test_a_model_the_registry_does_not_know_costs_nothing_to_fetch():
    assert NodeCaches(MODELS).fetch_s("node-a", "unknown") == 0.0


def test_the_fetch_bandwidth_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        NodeCaches(MODELS, fetch_bytes_per_s=0)


def test_a_workers_heartbeat_node_becomes_its_instance_node():
    assert instance_view(Heartbeat("w1", "cpu", "both", 0.0, node="node-b")).node == "node-b"
    assert instance_view(Heartbeat("w1", "cpu", "both", 0.0)).node is None


# ---------------------------------------------------------------------- through the service


async def publish_store_beats(h, store_id: str, node: str, cached: list[str]) -> None:
    await h.bus.publish(h.bus.subjects.store_heartbeat, beat(store_id, node, cached, 0.2))


async def test_without_store_heartbeats_the_policy_gets_no_locality_hint(harness):
    await harness.worker("w1", node="node-a")
    service = await harness.scheduler()
    await wait_for(lambda: "w1" in service._policy.instances, what="w1 to join")
    assert service._policy.instances["w1"].node == "node-a"
    assert service._policy.locality is None


async def test_a_request_goes_to_the_worker_whose_node_caches_its_model(harness):
    # Equally loaded, round-robin picks the first id ("w1", node-a) unless told where "b" is.
    w1 = await harness.worker("w1", node="node-a")
    w2 = await harness.worker("w2", node="node-b")
    service = await harness.scheduler()
    await wait_for(lambda: len(service._policy.instances) == 2, what="both workers to join")
    await publish_store_beats(harness, "store-a", "node-a", ["a"])
    await publish_store_beats(harness, "store-b", "node-b", ["b"])
    await wait_for(lambda: len(service.node_caches.stores) == 2, what="both store heartbeats")
    assert service._policy.locality is service.node_caches
    assert (await harness.submit("rb", "b", max_tokens=2)).accepted
    await wait_for(lambda: harness.finished("rb"), what="rb to finish")
    assert [c.request_id for c in w2.of_type(AssignRequest)] == ["rb"]
    assert w1.of_type(AssignRequest) == []


async def test_the_hint_is_dropped_when_every_store_falls_silent(harness):
    await harness.worker("w1", node="node-a")
    service = await harness.scheduler()
    await publish_store_beats(harness, "store-a", "node-a", ["a"])  # 0.2 s beats: stale in 0.6 s
    await wait_for(lambda: service._policy.locality is not None, what="the hint")
    await wait_for(lambda: service._policy.locality is None, what="the hint to go", timeout=3.0)
    assert not service.node_caches.known
