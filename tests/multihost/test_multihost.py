"""Aegaeon across hosts: seven hosts built on this machine with network namespaces (each its own
address on a bridge; only addresses inside namespaces the test made), a three-server NATS
cluster, Redis, a control host (scheduler, gateway) and two worker hosts, each with its own
model-store and shared memory (``driver.py`` says what happens). Asserted here:

- a model cached only on node B's host is served there (from the workers' turn events);
- a worker host crashed mid-stream (every process, its /dev/shm) and then the NATS server the
  surviving worker talks through: every stream finishes with exactly the tokens of an
  uninterrupted greedy run, the crashed host's requests having moved to the other host;
- on a second cluster, the models cached on node A reach node B's cache from A's (not from the
  models directory); then with node A's worker prefilling and node B's decoding, each request's
  KV goes from A's host pool to B's over a direct connection, and B never prefills it: tokens
  exact.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from netns import isolated_command, namespaces_available
from test_e2e import engine_greedy  # tests/ is on the path (its conftest.py)
from transformers import AutoTokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CACHED_ON_B = "demo-qwen2"
STREAMS = [("demo-llama", [11, 22, 33, 44]), ("demo-llama", [12, 23, 34, 45, 56]),
           ("demo-qwen2", [13, 24, 35, 46]), ("demo-qwen2", [14, 25, 36, 47, 58])]  # fmt: skip
MAX_TOKENS = 300  # ≥ 1 s per stream on one CPU thread: all are mid-stream at the crash
HANDOFF_STREAMS = [("demo-llama", [11, 22, 33, 44, 55, 66, 77, 88]), ("demo-qwen2", [13, 24, 35]),
                   ("demo-llama", [12, 23, 34])]  # fmt: skip
HANDOFF_TOKENS = 24
DRIVER = Path(__file__).with_name("driver.py")


def run_driver(demo_models_dir: Path, work: Path, *options: str) -> dict:
    """Run ``driver.py`` in private namespaces; its report, or a failure with the logs' tails."""
    why = namespaces_available()
    if why is not None:
        pytest.skip(f"needs Linux network namespaces: {why}")
    out = work / "report.json"
    command = [*isolated_command(), sys.executable, str(DRIVER), "--models", str(demo_models_dir),
               "--work", str(work), "--out", str(out), *options]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=540,
                          cwd=DRIVER.parent)  # fmt: skip
    result = json.loads(out.read_text()) if out.exists() else {}
    logs = work / "logs"
    tails = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                    for p in sorted(logs.glob("*.log"))) if logs.is_dir() else ""  # fmt: skip
    assert done.returncode == 0 and result.get("ok"), (
        f"driver rc {done.returncode}: {result.get('failure')}\n{done.stderr[-4000:]}{tails}"
    )
    print(json.dumps({k: v for k, v in result.items() if k != "streams"}, indent=1))
    return result


@pytest.fixture(scope="module")
def report(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_driver(demo_models_dir, tmp_path_factory.mktemp("multihost"),
                      "--streams", json.dumps(STREAMS), "--cached-on-b", CACHED_ON_B,
                      "--max-tokens", str(MAX_TOKENS))  # fmt: skip


def assert_exact(streams: list[dict], expected: list, max_tokens: int, models_dir: Path) -> None:
    """Each stream ended with [DONE] and exactly the text of an uninterrupted greedy run."""
    for stream, (model, prompt) in zip(streams, expected, strict=True):
        assert (stream["model"], stream["prompt"]) == (model, prompt)
        assert stream["error"] is None and stream["done"], stream
        tokenizer = AutoTokenizer.from_pretrained(models_dir / model)
        tokens = engine_greedy(models_dir, model, prompt, max_tokens, ignore_eos=True)
        assert stream["text"] == tokenizer.decode(tokens, skip_special_tokens=True), (model, prompt)


def test_a_model_cached_only_on_node_b_is_served_on_node_b(report: dict) -> None:
    assert CACHED_ON_B in report["cached_before"]["node-b"]
    assert CACHED_ON_B not in report["cached_before"]["node-a"]
    node_of = report["nodes"]
    assert [node_of[w] for w in report["locality"]["served_by"]] == ["node-b"]


def test_a_host_crash_then_a_nats_server_crash_leave_every_stream_exact(
    report: dict, demo_models_dir: Path
) -> None:
    crash = report["host_crash"]
    assert crash["its_requests"], "the crashed host held no stream: the crash proved nothing"
    assert report["nats_crash"]["streams_unfinished"] > 0, "the NATS crash came after the streams"
    assert report["exited"] == [], "a process the test did not kill exited"
    assert_exact(report["streams"], STREAMS, MAX_TOKENS, demo_models_dir)


@pytest.fixture(scope="module")
def handed(demo_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_driver(demo_models_dir, tmp_path_factory.mktemp("handoff"), "--scenario",
                      "handoff", "--streams", json.dumps(HANDOFF_STREAMS),
                      "--max-tokens", str(HANDOFF_TOKENS))  # fmt: skip


def test_weights_cached_on_one_host_reach_another_from_its_cache(handed: dict) -> None:
    weights = handed["weights"]
    assert weights["models"] == sorted({m for m, _ in HANDOFF_STREAMS})
    assert weights["peer_loads"] == len(weights["models"])  # each from node A, none from disk
    assert weights["peer_bytes"] > 0
    assert weights["endpoints"]["node-a"].startswith("10.88.0.")


def test_kv_prefilled_on_one_host_is_decoded_on_another_after_a_direct_transfer(handed: dict, demo_models_dir: Path) -> None:  # fmt: skip
    prefill, decode = "w-node-a", "w-node-b"
    assert handed["nodes"] == {prefill: "node-a", decode: "node-b"}
    assert handed["kv_endpoints"][prefill].startswith("10.88.0.")  # its host's own address
    assert handed["exited"] == []
    assert_exact(handed["streams"], HANDOFF_STREAMS, HANDOFF_TOKENS, demo_models_dir)
    requests = handed["requests"]
    assert len(requests) == len(HANDOFF_STREAMS)
    imports = {e["request_id"]: e for e in handed["imports"]}
    assert sorted(imports) == sorted(requests), handed["imports"]
    for event in imports.values():
        assert event["ok"] and event.get("across_nodes"), event
        assert (event["worker_id"], event["source_worker"]) == (decode, prefill)
        assert event["bytes"] > 0
    prefilled_by = {r: w for w, r in handed["prefilled"]}
    assert prefilled_by == dict.fromkeys(requests, prefill), "prefilled on the decode host"
    print(
        "\nKV across hosts, per request:",
        *(f"{e['bytes']} bytes in {e['seconds'] * 1000:.1f} ms" for e in imports.values()),
    )
