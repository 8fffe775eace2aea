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


# ------------------------------------------------------------------ the decode worker's import


@pytest.mark.parametrize("across_nodes", [False, True], ids=["same-node", "across-nodes"])
@pytest.mark.parametrize("source_alive", [True, False], ids=["source-alive", "source-gone"])
async def test_decode_worker_imports_the_kv_or_re_prefills_when_the_source_is_gone_with_identical_tokens(source_alive, across_nodes, demo_models_dir, nats_server, redis_server):  # fmt: skip
    """The worker shell around a real engine: an AssignRequest carrying a KV handle is imported
    (no prefill in the next turn) — mapped from the source's pool file on one node, fetched
    from the source's KV transfer server over TCP from another — or, when the prefill worker
    that exported it is gone, the request is re-prefilled from prompt + tokens; either way the
    tokens are the engine's own."""
    import msgspec
    import redis.asyncio as aioredis
    from aegaeon.gpu_worker.engine import Engine, EngineConfig
    from aegaeon.gpu_worker.worker import WorkerService
    from test_policies_e2e import MiB, engine_greedy, full_length_prompt
    from test_transfer import sent

    from aegaeon.bus import Bus
    from aegaeon.config import BusConfig
    from aegaeon.protocol import AssignRequest, RunTurn, SamplingParams, TokenBatch, WorkerEvent
    from aegaeon.transfer import TransferServer

    model, max_tokens = "demo-qwen2", 6
    prompt = full_length_prompt(demo_models_dir, model, 3, 14, max_tokens)
    expected = list(engine_greedy(demo_models_dir, model, tuple(prompt), max_tokens))
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0)

    def make_engine() -> Engine:
        engine = Engine(EngineConfig(device="cpu", arena_bytes=512 * MiB, host_kv_bytes=8 * MiB))
        engine.register_model(model, demo_models_dir / model)
        engine.switch_to(model)
        return engine

    source = make_engine()
    source.add_request("r", model, prompt, greedy)
    first = source.step(["r"])[0].token_id
    handle = source.export_kv("r")
    server = None
    if across_nodes:  # what KVHandoff._export_kv adds when the worker serves KV
        server = TransferServer("127.0.0.1:0")
        await server.start()
        token = server.offer("r", source.host_kv.path, handle.offset, handle.nbytes)
        handle = msgspec.structs.replace(handle, node="node-a", endpoint=server.endpoint, token=token)  # fmt: skip
    if not source_alive:
        source.close()  # its host pool (the shared-memory file) is gone with it
        if server is not None:
            await server.stop()

    config = BusConfig(nats_url=nats_server.url, redis_url=redis_server.url, prefix=f"kvimp{int(source_alive)}")  # fmt: skip
    bus = await Bus.connect(config, "test")
    redis = aioredis.Redis.from_url(config.redis_url)
    engine = make_engine()
    worker = WorkerService("d", "decode", engine, bus, redis)
    worker.registered[model] = "registered by the test"  # no model-store here
    worker.node = "node-b" if across_nodes else worker.node
    events: list = []
    tokens: list[int] = []

    async def on_event(event, _msg) -> None:
        events.append(event)

    async def on_tokens(batch, _msg) -> None:
        tokens.extend(t for e in batch.events for t in e.token_ids)

    await bus.subscribe(bus.subjects.worker_events("d"), WorkerEvent, on_event)
    await bus.subscribe(bus.subjects.tokens("gw"), TokenBatch, on_tokens)
    try:
        await worker._assign(AssignRequest("r", model, prompt, greedy, "gw", 0.0, [first], handle, "p"))  # fmt: skip
        await worker._run_turn(RunTurn(1, model, ["r"], quota_s=60.0))
        await wait_until(lambda: any(isinstance(e, TurnDone) for e in events), "the turn's TurnDone", events)  # fmt: skip
        if server is not None and source_alive:
            await sent(server, handle.nbytes)  # over the socket, not mapped
    finally:
        await bus.close()
        await redis.aclose()
        engine.close()
        if source_alive:
            source.close()
            if server is not None:
                await server.stop()
    (imported,) = [e for e in events if isinstance(e, KVImported)]
    (done,) = [e for e in events if isinstance(e, TurnDone)]
    assert (imported.ok, imported.source_worker) == (source_alive, "p"), imported
    assert imported.across_nodes == across_nodes
    assert done.prefilled == ([] if source_alive else ["r"])
    assert [first, *tokens] == expected
