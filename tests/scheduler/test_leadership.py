"""Leader election: the lease arithmetic on a hand-driven clock, the Redis lease (take, renew and
release only one's own, expiry), the leadership loop with stand-in services (one leader, take-over
after a stop or a crash, a leader that cannot renew stops before its lease can expire), and the
fenced bus and store — against the real NATS and Redis of the session."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from aegaeon.scheduler.fencing import FencedBus, FencedStore, NotLeader
from aegaeon.scheduler.leadership import Leadership, RedisLease, Renewal, Term
from aegaeon.scheduler.lease import Holder, LeaseClock, Sighting
from redis.exceptions import ConnectionError as RedisConnectionError

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import SamplingParams, SubmitRequest, TokenBatch
from aegaeon.state import Keys


async def wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------- the clock (pure)


def test_a_confirmed_lease_leads_until_ttl_less_margin_after_it_was_sent():
    clock = LeaseClock(ttl_s=3.0, renew_s=1.0, margin_s=0.5)
    assert not clock.leads(0.0)
    clock.confirmed(sent_at=10.0)
    assert clock.deadline == 12.5 and clock.renew_at == 11.0
    assert clock.leads(12.49) and not clock.leads(12.5)
    assert clock.wake_at() == 11.0


def test_a_failed_renew_retries_soon_and_keeps_the_deadline():
    clock = LeaseClock(ttl_s=3.0, renew_s=1.0, margin_s=0.5)
    clock.confirmed(sent_at=0.0)
    clock.failed(now=1.0)
    assert clock.renew_at == 1.25 and clock.deadline == 2.5
    clock.failed(now=2.4)
    assert clock.wake_at() == 2.5  # the deadline comes before the next retry
    clock.confirmed(sent_at=2.4)
    assert clock.deadline == pytest.approx(4.9)


def test_losing_ends_leading_at_once():
    clock = LeaseClock()
    clock.confirmed(sent_at=0.0)
    clock.lose()
    assert not clock.leads(0.1) and clock.wake_at() is None


def test_a_renew_interval_that_leaves_no_room_before_the_deadline_is_refused():
    with pytest.raises(ValueError, match="shorter than the lease ttl"):
        LeaseClock(ttl_s=1.0, renew_s=0.8, margin_s=0.5)
    with pytest.raises(ValueError, match="longer than the renew interval"):
        LeaseClock.of(ttl_s=1.0, renew_s=2.0)
    assert LeaseClock.of(3.0, 1.0).margin_s == 0.5
    assert LeaseClock.of(1.0, 0.6).margin_s == pytest.approx(0.2)


def test_a_term_stops_leading_at_its_deadline_even_when_nothing_else_ran():
    """A paused process wakes past its deadline: the fence says no before any loop ran."""
    now = [0.0]
    clock = LeaseClock(ttl_s=3.0, renew_s=1.0, margin_s=0.5)
    clock.confirmed(sent_at=0.0)
    term = Term(Holder("s", 1, "n"), clock, lambda: now[0], taken_at=0.0)
    assert term.leads()
    now[0] = 2.6
    assert not term.leads()


def test_a_standby_takes_a_free_key_at_once_unless_redis_restarted_under_a_live_lease():
    sighting = Sighting()
    assert sighting.may_take("run-1", now=0.0)  # never saw it held: free is free
    sighting.saw("run-1", ttl_left_s=2.0, now=10.0)
    assert sighting.may_take("run-1", now=10.1)  # same server: deleted or expired
    assert not sighting.may_take("run-2", now=11.9)  # restarted: its holder may still lead
    assert sighting.may_take("run-2", now=12.0)  # the lease seen has run out


def test_a_holder_reads_back_from_the_keys_value():
    holder = Holder("sched:a", 4242, "beef")
    assert Holder.parse(str(holder).encode()) == holder
    assert Holder.parse(None) is None and Holder.parse("garbage") is None
    assert Holder.new("x").nonce != Holder.new("x").nonce


# ---------------------------------------------------------------------- the Redis lease


@pytest.fixture
async def redis(redis_server):
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def key() -> str:
    return Keys(f"t{uuid.uuid4().hex[:10]}").scheduler_leader


async def test_the_lease_is_taken_once_and_names_its_holder(redis, key):
    lease = RedisLease(redis, key, ttl_ms=3000)
    first, second = Holder.new("a"), Holder.new("b")
    assert await lease.take(first)
    assert not await lease.take(second)
    assert await lease.holder() == first
    assert 0 < await redis.pttl(key) <= 3000


async def test_only_the_holder_renews_the_lease(redis, key):
    lease = RedisLease(redis, key, ttl_ms=3000)
    mine, other = Holder.new("a"), Holder.new("b")
    assert await lease.take(mine)
    await redis.pexpire(key, 500)
    assert await lease.renew(other) == "lost"
    assert await redis.pttl(key) <= 500 and await lease.holder() == mine
    assert await lease.renew(mine) == "extended"
    assert await redis.pttl(key) > 500


async def test_a_renew_sets_again_a_lease_that_redis_lost(redis, key):
    lease = RedisLease(redis, key, ttl_ms=3000)
    mine = Holder.new("a")
    assert await lease.take(mine)
    await redis.delete(key)  # as a Redis restarted without its data
    assert await lease.renew(mine) == "recreated"
    assert await lease.holder() == mine and 0 < await redis.pttl(key) <= 3000


async def test_only_the_holder_releases_the_lease(redis, key):
    lease = RedisLease(redis, key, ttl_ms=3000)
    mine, other = Holder.new("a"), Holder.new("b")
    assert await lease.take(mine)
    assert not await lease.release(other)
    assert await lease.holder() == mine
    assert await lease.release(mine)
    assert await redis.exists(key) == 0


async def test_a_standby_takes_the_lease_once_it_expired(redis, key):
    lease = RedisLease(redis, key, ttl_ms=200)
    assert await lease.take(Holder.new("dead"))
    standby = Holder.new("standby")
    assert not await lease.take(standby)
    deadline = time.monotonic() + 5
    while not await lease.take(standby):
        assert time.monotonic() < deadline, "the lease never expired"
        await asyncio.sleep(0.02)
    assert await lease.holder() == standby


# ---------------------------------------------------------------------- the leadership loop


class Terms:
    """A stand-in service: records each term it ran and when it was told to stop."""

    def __init__(self, crash: bool = False) -> None:
        self.started: list[Term] = []
        self.ended: list[float] = []
        self.crash = crash

    async def __call__(self, term: Term, stop: asyncio.Event) -> None:
        self.started.append(term)
        if self.crash:
            raise ValueError("boom")
        await stop.wait()
        self.ended.append(time.monotonic())

    @property
    def leading(self) -> bool:
        return len(self.started) > len(self.ended)


class FlakyLease(RedisLease):
    """A lease whose Redis can be cut off (renew and release fail) and that notes renew sends."""

    broken = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.renews_sent: list[tuple[float, bool]] = []  # (sent at, confirmed)
        self.renewals: list[Renewal] = []
        self.run_id: str | None = None  # set: what look() says the server's run id is

    async def look(self) -> tuple[str | None, float, str]:
        value, ttl_left_s, run_id = await super().look()
        return value, ttl_left_s, self.run_id or run_id

    async def renew(self, holder: Holder) -> Renewal:
        sent = time.monotonic()
        if self.broken:
            raise RedisConnectionError("cut off")
        renewal = await super().renew(holder)
        self.renews_sent.append((sent, renewal != "lost"))
        self.renewals.append(renewal)
        return renewal

    async def release(self, holder: Holder) -> bool:
        if self.broken:
            raise RedisConnectionError("cut off")
        return await super().release(holder)


def clock() -> LeaseClock:
    return LeaseClock(ttl_s=1.0, renew_s=0.25, margin_s=0.3)


def elect(redis, key, terms: Terms, name: str, lease_type=RedisLease):
    lease = lease_type(redis, key, clock().ttl_ms)
    leadership = Leadership(lease, name, clock(), terms, stop_grace_s=2.0)
    stop = asyncio.Event()
    return leadership, stop, asyncio.create_task(leadership.run(stop))


async def test_one_of_two_schedulers_leads_and_the_other_takes_over_when_it_stops(redis, key):
    a, b = Terms(), Terms()
    _, stop_a, run_a = elect(redis, key, a, "a")
    leadership_b, stop_b, run_b = elect(redis, key, b, "b")
    await wait_for(lambda: a.leading or b.leading, what="a leader")
    first, second = (a, b) if a.leading else (b, a)
    stop_first, stop_second = (stop_a, stop_b) if a.leading else (stop_b, stop_a)
    holder = await RedisLease(redis, key, 1000).holder()
    assert holder == first.started[0].holder and not second.started
    stop_first.set()
    await wait_for(lambda: second.leading, what="the standby to take over")
    assert first.ended and first.ended[0] <= second.started[0].taken_at  # never two at once
    stop_second.set()
    await asyncio.gather(run_a, run_b)
    assert await redis.exists(key) == 0  # released on a clean stop
    assert leadership_b.clock.deadline is None


async def test_a_standby_takes_over_within_ttl_and_a_renew_after_the_leader_dies(redis, key):
    dead, standby = Terms(), Terms()
    dead_leadership, _, run_dead = elect(redis, key, dead, "dead", FlakyLease)
    await wait_for(lambda: dead.leading, what="the first leader")
    _, stop, run_standby = elect(redis, key, standby, "standby")
    dead_leadership.lease.broken = True  # type: ignore[attr-defined]
    run_dead.cancel()  # as a SIGKILL: no renew, no release
    killed_at = time.monotonic()
    await asyncio.gather(run_dead, return_exceptions=True)
    assert Holder.parse(await redis.get(key)) == dead.started[0].holder
    await wait_for(lambda: standby.leading, what="the standby to take over")
    took = standby.started[0].taken_at - killed_at
    assert took < 5.0, took  # ttl 1 s + one attempt every 0.25 s, on a busy machine
    stop.set()
    await run_standby


async def test_a_process_started_while_the_lease_is_held_stands_by(redis, key):
    leader, late = Terms(), Terms()
    _, stop_leader, run_leader = elect(redis, key, leader, "leader")
    await wait_for(lambda: leader.leading, what="the leader")
    late_leadership, stop_late, run_late = elect(redis, key, late, "restarted")
    await wait_for(lambda: (late_leadership._seen or "").startswith("held by"), what="standby")
    assert not late.started and leader.leading
    stop_leader.set()
    await wait_for(lambda: late.leading, what="the restarted one to take over")
    stop_late.set()
    await asyncio.gather(run_leader, run_late)


async def test_a_leader_that_cannot_renew_stops_before_its_lease_can_expire(redis, key):
    terms = Terms()
    leadership, stop, run = elect(redis, key, terms, "cut-off", FlakyLease)
    lease = leadership.lease
    assert isinstance(lease, FlakyLease)
    await wait_for(lambda: any(ok for _, ok in lease.renews_sent), what="a confirmed renew")
    lease.broken = True
    term = terms.started[0]
    await wait_for(lambda: terms.ended, what="the leader to stop")
    last_confirmed = max(sent for sent, ok in lease.renews_sent if ok)
    earliest_expiry = last_confirmed + leadership.clock.ttl_s  # Redis ran it after it was sent
    assert terms.ended[0] < earliest_expiry
    assert not term.leads()
    assert await redis.get(key) == str(term.holder).encode()  # still ours: it stopped early
    lease.broken = False
    stop.set()
    await run


async def test_a_leader_whose_lease_was_taken_stands_by_and_leaves_the_new_lease_alone(redis, key):
    terms = Terms()
    _, stop, run = elect(redis, key, terms, "old")
    await wait_for(lambda: terms.leading, what="the leader")
    await redis.set(key, "usurper:1:x", px=60_000)  # its lease expired and another took it
    await wait_for(lambda: terms.ended, what="the old leader to stop")
    assert await redis.get(key) == b"usurper:1:x"
    stop.set()
    await run
    assert await redis.get(key) == b"usurper:1:x"


async def test_a_standby_leaves_a_lease_lost_in_a_redis_restart_to_its_leader(redis, key):
    leader, standby = Terms(), Terms()
    leader_leadership, stop_leader, run_leader = elect(redis, key, leader, "leader", FlakyLease)
    await wait_for(lambda: leader.leading, what="the leader")
    standby_leadership, stop_standby, run_standby = elect(
        redis, key, standby, "standby", FlakyLease
    )
    await wait_for(lambda: (standby_leadership._seen or "").startswith("held by"), what="standby")
    seen_by_standby = standby_leadership.lease
    leader_lease = leader_leadership.lease
    assert isinstance(seen_by_standby, FlakyLease) and isinstance(leader_lease, FlakyLease)
    seen_by_standby.run_id = "a-restarted-server"
    await redis.delete(key)  # the restart lost the key; the leader still leads
    await wait_for(lambda: "recreated" in leader_lease.renewals, what="the leader to set it again")
    assert not standby.started and leader.leading
    assert await RedisLease(redis, key, 1000).holder() == leader.started[0].holder
    stop_leader.set()
    await wait_for(lambda: standby.leading, what="the standby after a clean stop")
    stop_standby.set()
    await asyncio.gather(run_leader, run_standby)


async def test_a_crashed_service_releases_the_lease_and_ends_the_process(redis, key):
    _, _, run = elect(redis, key, Terms(crash=True), "crashing")
    with pytest.raises(RuntimeError, match="crashed"):
        await asyncio.wait_for(run, 10)
    assert await redis.exists(key) == 0


# ---------------------------------------------------------------------- the fences


async def test_a_fenced_bus_and_store_act_only_while_the_term_leads(nats_server, redis_server):
    config = BusConfig(nats_server.url, redis_server.url, prefix=f"t{uuid.uuid4().hex[:10]}")
    bus = await Bus.connect(config, "test")
    redis = aioredis.Redis.from_url(config.redis_url)
    seen: list[TokenBatch] = []

    async def on_tokens(batch: TokenBatch, _msg: Any) -> None:
        seen.append(batch)

    leading = [True]
    fenced = FencedBus(bus, lambda: leading[0])
    store = FencedStore(redis, config.prefix, lambda: leading[0])
    submit = SubmitRequest("r1", "m", [1, 2], SamplingParams(max_tokens=2), "gw", time.time())
    try:
        await bus.subscribe(bus.subjects.tokens("gw"), TokenBatch, on_tokens)
        await fenced.publish(bus.subjects.tokens("gw"), TokenBatch([]))
        await wait_for(lambda: seen, what="the message of a leading term")
        await store.persist(submit)
        assert await redis.hexists(store.keys.queue, "r1")
        leading[0] = False
        with pytest.raises(NotLeader):
            await fenced.publish(bus.subjects.tokens("gw"), TokenBatch([]))
        with pytest.raises(NotLeader):
            await store.finish("r1", "stop", 2)
        assert await redis.hexists(store.keys.queue, "r1")  # not rewritten by a past leader
        await bus.nc.flush()
        assert len(seen) == 1
    finally:
        await bus.close()
        await redis.aclose()


async def test_each_term_gets_a_larger_epoch_even_after_redis_lost_the_last_one(redis, key):
    lease = RedisLease(redis, key, ttl_ms=3000)
    first = await lease.take(Holder.new("a"))
    assert first > 0
    await lease.release(Holder.parse(await redis.get(key)))  # type: ignore[arg-type]
    second = await lease.take(Holder.new("b"))
    assert second > first
    await redis.delete(key, lease.epoch_key)  # a Redis restarted without its data
    third = await lease.take(Holder.new("c"))
    assert third > second  # Redis's clock in microseconds: later than any earlier term's
    assert not await lease.take(Holder.new("d"))  # held: no term, epoch 0
