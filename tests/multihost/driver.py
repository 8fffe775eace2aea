"""The multi-host scenario, run as PID 1 of private namespaces (``test_multihost.py`` starts it
under :func:`netns.isolated_command`): build the hosts and the cluster, then

1. warm one model into node B's host cache only, and see from the workers' events that its first
   request is served on node B (locality);
2. stream several greedy completions of two models through the gateway; once all are under way,
   crash the worker host holding most of them (every process, its /dev/shm), and see their
   requests move to the other worker host;
3. then kill the NATS server the surviving worker is connected to;
4. let every stream finish, and write what each returned (the test compares it with an
   uninterrupted run) and what happened, as JSON to ``--out``.

With ``--scenario handoff`` instead: node A's worker prefills, node B's decodes, each serving
its exported KV (and each store its cached weights) from its own address; first cache every
model on node A, then ask node B's store for them (they come from node A's cache); stream the
completions and record every KV hand-off (``KVImported``) and which worker prefilled which
request (``TurnDone.prefilled``).

Usage: ``python driver.py --models DIR --work DIR --out FILE --streams JSON [--scenario S]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
from cluster import PREFIX, REDIS_HOST, Cluster
from netns import Network

from aegaeon.bus import Bus
from aegaeon.config import BusConfig
from aegaeon.protocol import (
    EnsureCached,
    Heartbeat,
    KVImported,
    ModelReply,
    RequestDone,
    RunTurn,
    SchedulerState,
    StoreHeartbeat,
    TurnDone,
    WorkerCommand,
    WorkerEvent,
)
from aegaeon.subjects import host_token

NODES = ["node-a", "node-b"]
STARTED_PIECES = 5  # text pieces each stream has before the host crash


class Watch:
    """What the driver hears on the bus: workers, stores, the scheduler's state, the turns it
    commands and the requests that end."""

    def __init__(self) -> None:
        self.workers: dict[str, Heartbeat] = {}
        self.stores: dict[str, StoreHeartbeat] = {}
        self.state: SchedulerState | None = None
        self.commanded: list[tuple[float, str, RunTurn]] = []  # (when, worker id, turn)
        self.ended: set[str] = set()
        self.imports: list[KVImported] = []
        self.prefilled: list[tuple[str, str]] = []  # (worker id, request id) per prefill

    async def attach(self, bus: Bus) -> None:
        async def on_beat(beat: Heartbeat, _msg: Any) -> None:
            self.workers[beat.worker_id] = beat

        async def on_store(beat: StoreHeartbeat, _msg: Any) -> None:
            self.stores[beat.node] = beat

        async def on_state(state: SchedulerState, _msg: Any) -> None:
            self.state = state

        async def on_event(event: Any, _msg: Any) -> None:
            if isinstance(event, RequestDone):
                self.ended.add(event.request_id)
            elif isinstance(event, KVImported):
                self.imports.append(event)
            elif isinstance(event, TurnDone):
                self.prefilled += [(event.worker_id, r) for r in event.prefilled]

        async def on_command(command: Any, msg: Any) -> None:
            if isinstance(command, RunTurn):  # subject: <prefix>.worker.<id>.cmd
                self.commanded.append((time.monotonic(), msg.subject.split(".")[-2], command))

        await bus.subscribe(bus.subjects.heartbeat, Heartbeat, on_beat)
        await bus.subscribe(bus.subjects.store_heartbeat, StoreHeartbeat, on_store)
        await bus.subscribe(bus.subjects.scheduler_state, SchedulerState, on_state)
        await bus.subscribe(bus.subjects.all_worker_events, WorkerEvent, on_event)
        await bus.subscribe(bus.subjects.worker_cmd("*"), WorkerCommand, on_command)

    def holders(self) -> dict[str, str]:
        """Each unfinished request → the worker last commanded to run it."""
        held = {r: w for _, w, turn in self.commanded for r in turn.request_ids}
        return {r: w for r, w in held.items() if r not in self.ended}

    def run_on_since(self, worker_id: str, since: float) -> set[str]:
        """The requests commanded to ``worker_id`` since ``since``."""
        return {r for at, w, turn in self.commanded if at >= since and w == worker_id
                for r in turn.request_ids}  # fmt: skip

    def models_run_on(self, model: str) -> list[str]:
        """The workers commanded to run ``model`` so far."""
        return sorted({w for _, w, turn in self.commanded if turn.model == model})


async def until(condition, seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.05)
    return value


def new_stream(model: str, prompt: list[int]) -> dict:
    return {"model": model, "prompt": prompt, "pieces": [], "done": False, "error": None}


async def stream(url: str, result: dict, max_tokens: int) -> dict:
    """One greedy streamed completion into ``result`` (:func:`new_stream`): its text pieces as
    they come, and whether it ended with [DONE]."""
    body = {"model": result["model"], "prompt": result["prompt"], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}  # fmt: skip
    try:
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(180.0)) as client,
            client.stream("POST", f"{url}/v1/completions", json=body) as response,
        ):
            if response.status_code != 200:
                result["error"] = f"HTTP {response.status_code}: {(await response.aread())!r}"
                return result
            async for line in response.aiter_lines():
                if line == "data: [DONE]":
                    result["done"] = True
                elif line.startswith("data: "):
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        result["error"] = chunk["error"]
                    for choice in chunk.get("choices", []):
                        result["pieces"].append(choice["text"])
    except httpx.HTTPError as exc:
        result["error"] = repr(exc)
    return result


async def ensure_on(bus: Bus, node: str, model: str) -> None:
    """``model`` in the host cache of ``node``'s store."""
    reply = await bus.request(bus.subjects.models(f"ensure.{host_token(node)}"),
                              EnsureCached(model), ModelReply, timeout=60)  # fmt: skip
    assert reply.error == "", reply.error


async def joined(cluster: Cluster, report: dict) -> tuple[Bus, Watch]:
    """The driver on the bus, once both stores and both workers have joined."""
    config = BusConfig(cluster.nats_url,
                       f"redis://{cluster.network.hosts[REDIS_HOST].address}:6379/0",
                       prefix=PREFIX)  # fmt: skip
    bus = await Bus.connect(config, "multihost-driver")
    watch = Watch()
    await watch.attach(bus)
    workers = {w.worker_id for w in cluster.workers.values()}
    await until(lambda: set(watch.stores) == set(NODES), 60, "both model-stores")
    await until(lambda: watch.state and {w.worker_id for w in watch.state.workers} == workers,
                120, "both workers joined the scheduler")  # fmt: skip
    await until(lambda: workers <= set(watch.workers), 10, "both workers' heartbeats")
    report["nodes"] = {w: watch.workers[w].node for w in workers}
    report["kv_endpoints"] = {w: watch.workers[w].kv_endpoint for w in workers}
    return bus, watch


async def handoff(cluster: Cluster, args: argparse.Namespace, report: dict) -> None:
    """Weights cached on node A reach node B from A's cache; then prefill on node A, decode on
    node B: every request's KV crosses the network."""
    bus, watch = await joined(cluster, report)
    try:
        streams = [new_stream(m, p) for m, p in json.loads(args.streams)]
        models = sorted({s["model"] for s in streams})
        for model in models:
            await ensure_on(bus, "node-a", model)

        def all_cached_on_a() -> float | None:
            beat = watch.stores["node-a"]
            return beat.time if set(models) <= set(beat.cached) else None

        first = await until(all_cached_on_a, 20, "node A's store to say it caches every model")
        # Two more beats: node B's store, subscribed as the driver is, has heard the first by
        # then even on a loaded machine (a peer's beat counts as fresh for three intervals).
        await until(lambda: watch.stores["node-a"].time >= first + 2.0, 10, "node A's next beats")
        for model in models:
            await ensure_on(bus, "node-b", model)
        await until(lambda: set(models) <= set(watch.stores["node-b"].cached), 20,
                    "node B's store to say it caches every model")  # fmt: skip
        beat = watch.stores["node-b"]
        report["weights"] = {"models": models, "peer_loads": beat.peer_loads,
                             "peer_bytes": beat.peer_bytes,
                             "endpoints": {n: s.transfer_endpoint for n, s in watch.stores.items()}}  # fmt: skip
        results = await asyncio.wait_for(asyncio.gather(
            *(stream(cluster.gateway_url, s, args.max_tokens) for s in streams)), 240)  # fmt: skip
        await until(lambda: len(watch.ended) >= len(streams), 30, "every RequestDone")
        report["streams"] = [{**r, "text": "".join(r.pop("pieces"))} for r in results]
        report["requests"] = sorted(watch.ended)
        report["imports"] = [msgspec.to_builtins(e) for e in watch.imports]
        report["prefilled"] = watch.prefilled
        report["exited"] = cluster.exited()
    finally:
        await bus.close()


async def scenario(cluster: Cluster, args: argparse.Namespace, report: dict) -> None:
    bus, watch = await joined(cluster, report)
    workers = {w.worker_id for w in cluster.workers.values()}
    try:
        # 1. locality: a model only node B caches is served on node B
        cached = args.cached_on_b
        await ensure_on(bus, "node-b", cached)
        await until(lambda: watch.state and cached in watch.state.cached.get("node-b", []), 20,
                    "the scheduler to hear node B's cache")  # fmt: skip
        report["cached_before"] = {n: sorted(s.cached) for n, s in watch.stores.items()}
        first = await stream(cluster.gateway_url, new_stream(cached, [5, 6, 7, 8]), 4)
        assert first["done"], first
        report["locality"] = {"model": cached, "served_by": watch.models_run_on(cached)}

        # 2. streams, then a worker host crashes under them
        streams = [new_stream(m, p) for m, p in json.loads(args.streams)]
        tasks = [asyncio.create_task(stream(cluster.gateway_url, s, args.max_tokens))
                 for s in streams]  # fmt: skip
        await until(lambda: all(len(s["pieces"]) >= STARTED_PIECES for s in streams), 90,
                    "every stream under way")  # fmt: skip
        held = watch.holders()
        counts = {w: sum(1 for h in held.values() if h == w) for w in sorted(workers)}
        victim_id = max(sorted(counts), key=lambda w: counts[w])
        victim = next(w for w in cluster.workers.values() if w.worker_id == victim_id)
        survivor = next(w for w in cluster.workers.values() if w.worker_id != victim_id)
        moved = sorted(r for r, w in held.items() if w == victim_id)
        crash_at = time.monotonic()
        victim.host.crash()
        report["host_crash"] = {"host": victim.node, "worker": victim_id, "held": counts,
                                "its_requests": moved}  # fmt: skip
        await until(lambda: set(moved) <= watch.run_on_since(survivor.worker_id, crash_at),
                    90, "the crashed host's requests to run on the other host")  # fmt: skip
        report["host_crash"]["moved_after_s"] = round(time.monotonic() - crash_at, 2)

        # 3. the NATS server the surviving worker talks through dies
        member = cluster.connections_of(f"worker-{survivor.worker_id}")
        unfinished = sum(1 for t in tasks if not t.done())
        assert member is not None, "the surviving worker is not connected to any NATS member"
        nats_kill_at = time.monotonic()
        cluster.nats[member].crash()
        await until(lambda: (m := cluster.connections_of(f"worker-{survivor.worker_id}"))
                    and m != member, 30, "the worker to reconnect to another member")  # fmt: skip
        report["nats_crash"] = {"member": member, "streams_unfinished": unfinished,
                                "worker_reconnected_after_s":
                                    round(time.monotonic() - nats_kill_at, 2)}  # fmt: skip

        # 4. every stream ends
        results = await asyncio.wait_for(asyncio.gather(*tasks), 240)
        report["streams"] = [{**r, "text": "".join(r.pop("pieces"))} for r in results]
        report["exited"] = cluster.exited()
    finally:
        await bus.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--streams", required=True, help="JSON list of [model, prompt]")
    parser.add_argument("--scenario", choices=["crash", "handoff"], default="crash")
    parser.add_argument("--cached-on-b", default="")
    parser.add_argument("--max-tokens", type=int, default=300)
    args = parser.parse_args()
    report: dict = {}
    started = time.monotonic()
    network = Network()
    cluster = Cluster(network, args.models, args.work)
    try:
        if args.scenario == "handoff":
            cluster.start(NODES, roles={"node-a": "prefill", "node-b": "decode"}, transfers=True)
            report["started_s"] = round(time.monotonic() - started, 1)
            asyncio.run(handoff(cluster, args, report))
        else:
            cluster.start(NODES)
            report["started_s"] = round(time.monotonic() - started, 1)
            asyncio.run(scenario(cluster, args, report))
        report["ok"] = True
    except BaseException as exc:
        report["ok"] = False
        report["failure"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        cluster.stop()
        report["wall_s"] = round(time.monotonic() - started, 1)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
