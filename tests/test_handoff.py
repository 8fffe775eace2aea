"""Prefill → decode KV hand-off through the node's host KV pool, end to end: the embedded stack
(`aegaeon up --roles prefill,decode`, policy aegaeon) with one prefill and one decode worker on
this host, greedy requests over two demo models sent over HTTP/SSE.

Every stream must equal the engine's own uninterrupted greedy output, and the workers' events
on NATS must show the hand-off really happened without a second prefill: one ``KVImported``
with ``ok`` per request from the decode worker, whose ``TurnDone.prefilled`` never names them.
"""

from __future__ import annotations

import asyncio

import pytest
from test_policies_e2e import TWO, assert_exact, make_trace, send_all, stack, subset, watch_events

from aegaeon.protocol import KVImported, RequestDone, TurnDone

pytestmark = pytest.mark.slow

PREFILL, DECODE = "worker-0", "worker-1"  # the order of --roles
POLICY = "aegaeon"


async def wait_until(condition, what: str, events: list, timeout: float = 120.0) -> None:
    """Poll the collected events until ``condition`` holds (the timeout only bounds a failure)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.05)
    assert condition(), f"{what}: {events}"


def test_prefilled_kv_is_imported_by_the_decode_worker_on_the_same_node_without_a_re_prefill(demo_models_dir, nats_server, redis_server, tmp_path):  # fmt: skip
    models_dir = subset(demo_models_dir, tmp_path / "models", TWO)
    trace = make_trace(demo_models_dir, TWO, per_model=2, max_tokens=8)
    subject = f"pe2e_{POLICY}.worker.*.events"
    events: list = []
    servers = (nats_server, redis_server)
    with stack(tmp_path / "home", models_dir, POLICY, servers, workers=2,
               extra=["--roles", "prefill,decode"]) as running:  # fmt: skip

        async def run() -> list[tuple[str, int, str | None]]:
            ready, stop = asyncio.Event(), asyncio.Event()
            watcher = asyncio.create_task(watch_events(nats_server.url, subject, events, ready, stop))  # fmt: skip
            await ready.wait()
            results = await asyncio.to_thread(send_all, running.url, trace)

            def finished_on_decode() -> set[str]:
                return {r for e in events if isinstance(e, TurnDone) and e.worker_id == DECODE
                        for r in e.finished}  # fmt: skip

            def ended() -> set[str]:
                return {e.request_id for e in events if isinstance(e, RequestDone)
                        and e.finish_reason == "length"}  # fmt: skip

            # Every request's last TurnDone (after its last token) has reached the watcher.
            await wait_until(lambda: len(ended()) == len(trace) and ended() <= finished_on_decode(),
                             "every request ends in a decode turn", events)  # fmt: skip
            stop.set()
            await watcher
            return results

        results = asyncio.run(run())
    assert_exact(demo_models_dir, trace, results)
    imports = [e for e in events if isinstance(e, KVImported)]
    requests = {e.request_id for e in events if isinstance(e, RequestDone) and e.finish_reason == "length"}  # fmt: skip
    assert len(requests) == len(trace)
    assert sorted(e.request_id for e in imports if e.ok) == sorted(requests), imports
    assert all(
        e.worker_id == DECODE and e.source_worker == PREFILL and e.bytes > 0 for e in imports
    )
    prefilled = {r: e.worker_id for e in events if isinstance(e, TurnDone) for r in e.prefilled}
    assert all(prefilled.get(r) == PREFILL for r in requests), prefilled  # prefilled once, there
    decode_turns = [e for e in events if isinstance(e, TurnDone) and e.worker_id == DECODE]
    assert not {r for t in decode_turns for r in t.prefilled} & requests, "re-prefilled on decode"
    print("\nKV hand-off (import on the decode worker), per request:")
    for e in imports:
        print(f"  {e.request_id}: {e.seconds * 1000:.2f} ms, {e.bytes} bytes")
