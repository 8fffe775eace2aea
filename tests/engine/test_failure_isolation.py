"""A failure is one request's alone (DESIGN.md §5): when one request's draw or forward pass
raises, that request ends with an error output and every other request of the same batch goes on
with exactly transformers' tokens.

The failures are injected (a draw or a runner call that raises for one request's input): the
engine's isolation is under test, not what made it fail.
"""

from __future__ import annotations

import asyncio

import pytest
from aegaeon.gpu_worker import stepping
from aegaeon.gpu_worker.worker import CLIENT_ERROR
from engine_helpers import GREEDY, MODELS, NATIVE, PROMPTS, run_all
from worker_harness import GATEWAY, WorkerHarness

from aegaeon.protocol import (
    AssignRequest,
    RequestDone,
    RunTurn,
    SamplingParams,
    TurnDone,
    WorkerError,
)

BAD_PROMPT = list(range(60, 110))  # 50 tokens: longer than any good request ever gets
BAD_SEED = 424242
MODEL = "demo-llama"


def fail_draw_at(monkeypatch, token: int) -> None:
    """The bad request's draw of its ``token``-th output raises (the others draw as usual)."""
    real_choose = stepping.choose

    def choose(row, sampling, outputs, seed):
        if seed == BAD_SEED and len(outputs) == token:
            raise RuntimeError("injected: a draw that cannot be made")
        return real_choose(row, sampling, outputs, seed)

    monkeypatch.setattr(stepping, "choose", choose)


def _add_batch(engine, model: str, bad: SamplingParams = GREEDY) -> list[str]:
    """The reference prompts, then the bad request last (so the requests before it ran)."""
    engine.switch_to(model)
    ids = [f"r{i}" for i in range(len(PROMPTS))]
    for rid, prompt in zip(ids, PROMPTS, strict=True):
        engine.add_request(rid, model, prompt, GREEDY)
    engine.add_request("bad", model, BAD_PROMPT, bad)
    return ids


def _assert_good_exact_and_bad_failed(engine, got, ids, references, model, device) -> None:
    ref_tokens, _ = references(model, device)
    for i, rid in enumerate(ids):
        assert [o.token_id for o in got[rid]] == ref_tokens[i], rid
        assert got[rid][-1].finish_reason == "length"
    last = got["bad"][-1]
    assert last.finish_reason == "error" and last.error and "injected" in last.error
    assert all(o.error is None for o in got["bad"][:-1])
    assert engine.request_ids() == []


@pytest.mark.parametrize("model", MODELS)
def test_a_draw_that_raises_fails_only_its_request(
    make_engine, references, device, model, monkeypatch
):
    fail_draw_at(monkeypatch, 3)
    engine = make_engine()
    ids = _add_batch(
        engine,
        model,
        SamplingParams(max_tokens=12, temperature=0.8, seed=BAD_SEED, ignore_eos=True),
    )
    got = run_all(engine, [*ids, "bad"])
    _assert_good_exact_and_bad_failed(engine, got, ids, references, model, device)
    assert len(got["bad"]) == 4  # three tokens, then the error


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("model", NATIVE)
def test_a_forward_that_raises_for_one_request_is_rerun_alone_and_fails_only_it(
    make_engine, references, device, model, phase, monkeypatch
):
    engine = make_engine()
    ids = _add_batch(engine, model)
    runner = engine._native[engine.specs[model].hf_config.model_type]
    real_prefill, real_decode = runner.prefill, runner.decode

    def prefill(tokens, blocks, kv):
        if phase == "prefill" and BAD_PROMPT in tokens:
            raise RuntimeError("injected: a prefill that fails on one prompt")
        return real_prefill(tokens, blocks, kv)

    def decode(last, lengths, blocks, kv):
        # The bad request's fourth decode (its lengths are the only ones past 50).
        if phase == "decode" and len(BAD_PROMPT) + 4 in lengths:
            raise RuntimeError("injected: a decode that fails on one request")
        return real_decode(last, lengths, blocks, kv)

    monkeypatch.setattr(runner, "prefill", prefill)
    monkeypatch.setattr(runner, "decode", decode)
    got = run_all(engine, [*ids, "bad"])
    _assert_good_exact_and_bad_failed(engine, got, ids, references, model, device)
    assert len(got["bad"]) == (1 if phase == "prefill" else 5)


def test_a_fallback_forward_that_raises_leaves_the_others_caches_as_they_were(
    make_engine, references, device, monkeypatch
):
    """The fallback runner steps requests one after another: the ones before the failure had
    already grown their caches, which a retry must not grow twice."""
    engine = make_engine()
    ids = _add_batch(engine, "demo-gpt2")
    real_forward = engine._fallback.forward

    def forward(tokens, past):
        if tokens == BAD_PROMPT:
            raise RuntimeError("injected: a forward that fails on one prompt")
        return real_forward(tokens, past)

    monkeypatch.setattr(engine._fallback, "forward", forward)
    got = run_all(engine, [*ids, "bad"])
    _assert_good_exact_and_bad_failed(engine, got, ids, references, "demo-gpt2", device)
    assert len(got["bad"]) == 1


def test_the_worker_ends_only_the_failed_request_and_tells_its_client_no_internals(
    demo_models_dir, nats_server, redis_server, references, device, make_engine, monkeypatch
):
    """Through the worker: the failed request's client gets a generic error, the scheduler gets
    the cause in RequestDone, the turn ends normally, the batch's other streams are exact."""
    fail_draw_at(monkeypatch, 2)
    engine = make_engine(None, host_kv_bytes=16 << 20)
    engine.register_model(MODEL, demo_models_dir / MODEL)
    bad = SamplingParams(max_tokens=12, temperature=0.8, seed=BAD_SEED, ignore_eos=True)

    async def run() -> WorkerHarness:
        async with WorkerHarness(engine, demo_models_dir, nats_server.url, redis_server.url) as w:
            ids = [f"r{i}" for i in range(len(PROMPTS))]
            for rid, prompt in zip(ids, PROMPTS, strict=True):
                await w.send(AssignRequest(rid, MODEL, prompt, GREEDY, GATEWAY, 0.0))
            await w.send(AssignRequest("bad", MODEL, BAD_PROMPT, bad, GATEWAY, 0.0))
            await w.send(RunTurn(1, MODEL, [*ids, "bad"], quota_s=1e6))
            assert isinstance(await w.turn_ended(), TurnDone)
        return w

    w = asyncio.run(run())
    ref_tokens, _ = references(MODEL, device)
    for i in range(len(PROMPTS)):
        assert w.tokens[f"r{i}"] == ref_tokens[i]
    last = w.token_events["bad"][-1]
    assert len(w.tokens["bad"]) == 2
    assert last.finish_reason == "error" and last.error == CLIENT_ERROR
    done = {e.request_id: e for e in w.events if isinstance(e, RequestDone)}
    assert done["bad"].finish_reason == "error" and "injected" in done["bad"].message
    assert {done[f"r{i}"].finish_reason for i in range(len(PROMPTS))} == {"length"}
    assert not [e for e in w.events if isinstance(e, WorkerError)]
