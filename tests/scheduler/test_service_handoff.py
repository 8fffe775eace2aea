"""Prefill → decode KV hand-off through the scheduler service, with the fake workers of
``scheduler_harness`` (real NATS and Redis, the real scheduler): the prefill worker keeps the KV it
exported until the decode worker reports KVImported, and every failure ends in a complete
stream (the fakes emit token ``1000 + index``, so a repeated or missing token shows)."""

from __future__ import annotations

from aegaeon.scheduler.policies import POLICIES
from scheduler_harness import HandoffScript, expected_stream, harness, wait_for

from aegaeon.protocol import AbortRequest, AssignRequest, KVImported, RunTurn

__all__ = ["harness"]  # the fixture, shared with test_service


async def two_roles(harness, monkeypatch, prefill_node: str = "n1", decode_node: str = "n1", kv_endpoint: str = ""):  # fmt: skip
    monkeypatch.setitem(POLICIES, "test-handoff", f"{HandoffScript.__module__}:HandoffScript")
    prefill = await harness.worker("p", role="prefill", node=prefill_node, kv_endpoint=kv_endpoint)
    decode = await harness.worker("d", role="decode", node=decode_node)
    await harness.scheduler(policy="test-handoff", policy_options={})
    return prefill, decode


def aborts(worker) -> list[str]:
    return [a.request_id for a in worker.of_type(AbortRequest)]


async def test_on_one_node_the_decode_worker_gets_the_kv_handle_and_the_source_frees_it_after_the_import(harness, monkeypatch):  # fmt: skip
    prefill, decode = await two_roles(harness, monkeypatch)
    decode.reports_imports, decode.answer = False, False
    await harness.submit("r1", max_tokens=3)
    await wait_for(lambda: decode.of_type(RunTurn), what="r1's first decode turn on d")
    assert [t.export_kv for t in prefill.of_type(RunTurn)] == [["r1"]]
    (assign,) = decode.of_type(AssignRequest)
    assert assign.kv is not None and assign.kv_source == "p"
    assert assign.output_token_ids == [1000]
    assert assign.kv.num_tokens == len(assign.prompt_token_ids)  # prompt + 1 output - 1
    assert aborts(prefill) == []  # the decode worker has not copied the KV yet
    await harness.bus.publish(
        harness.bus.subjects.worker_events("d"), KVImported("d", "r1", "p", ok=True, bytes=4096)
    )
    await wait_for(lambda: aborts(prefill) == ["r1"], what="the source to be told to free r1")
    decode.answer = True
    await decode.run_turn(decode.of_type(RunTurn)[0])
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish on d")
    assert harness.stream("r1") == expected_stream(3)


async def test_across_nodes_the_kv_goes_to_the_decode_worker_when_the_prefill_worker_serves_it(harness, monkeypatch):  # fmt: skip
    prefill, decode = await two_roles(harness, monkeypatch, "n1", "n2", kv_endpoint="10.0.0.1:7400")  # fmt: skip
    await harness.submit("r1", max_tokens=3)
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish on d")
    assert [t.export_kv for t in prefill.of_type(RunTurn)] == [["r1"]]
    (assign,) = decode.of_type(AssignRequest)
    assert assign.kv is not None and assign.kv_source == "p"
    assert assign.kv.endpoint == "10.0.0.1:7400"
    await wait_for(lambda: aborts(prefill) == ["r1"], what="the source to be told to free r1")
    assert harness.stream("r1") == expected_stream(3)


async def test_across_nodes_nothing_is_exported_and_the_decode_worker_re_prefills(harness, monkeypatch):  # fmt: skip
    prefill, decode = await two_roles(harness, monkeypatch, "n1", "n2")
    await harness.submit("r1", max_tokens=3)
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish on d")
    assert [t.export_kv for t in prefill.of_type(RunTurn)] == [[]]
    assert [(a.kv, a.kv_source) for a in decode.of_type(AssignRequest)] == [(None, None)]
    assert aborts(prefill) == ["r1"]
    assert harness.stream("r1") == expected_stream(3)


async def test_a_failed_import_still_frees_the_source_and_the_stream_is_complete(harness, monkeypatch):  # fmt: skip
    prefill, decode = await two_roles(harness, monkeypatch)
    decode.import_ok = False  # as when the source died: the decode worker re-prefills
    await harness.submit("r1", max_tokens=4)
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish on d")
    await wait_for(lambda: aborts(prefill) == ["r1"], what="the source to be told to free r1")
    assert harness.stream("r1") == expected_stream(4)


async def test_when_the_decode_worker_dies_before_importing_the_source_frees_the_kv_and_the_request_reruns(harness, monkeypatch):  # fmt: skip
    prefill, decode = await two_roles(harness, monkeypatch)
    decode.reports_imports = False
    decode.answer = False
    await harness.submit("r1", max_tokens=3)
    await wait_for(lambda: decode.of_type(AssignRequest), what="r1 assigned to d")
    decode.kill()
    await wait_for(lambda: "r1" in aborts(prefill), what="the source to be told to free r1")
    await harness.worker("d", role="decode", node="n1")  # a new decode worker takes over
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish")
    assert harness.stream("r1") == expected_stream(3)


async def test_prefilled_request_is_handed_off_to_the_decode_worker(harness, monkeypatch):
    monkeypatch.setitem(POLICIES, "test-handoff", f"{HandoffScript.__module__}:HandoffScript")
    prefill = await harness.worker("p", role="prefill")
    decode = await harness.worker("d", role="decode")
    await harness.scheduler(policy="test-handoff", policy_options={})
    await harness.submit("r1", max_tokens=3)
    await wait_for(lambda: harness.finished("r1"), what="r1 to finish on d")
    assert [t.prefill_only for t in prefill.of_type(RunTurn)] == [True]
    assert [a.request_id for a in prefill.of_type(AbortRequest)] == ["r1"]  # its KV freed
    assert [a.output_token_ids for a in decode.of_type(AssignRequest)] == [[1000]]
    assert harness.stream("r1") == expected_stream(3)
