"""The benchmarks' streaming client: one ``/v1/completions`` SSE request, timed token by token,
and what its outcome was.

Every request ends in exactly one bucket (:func:`classify`):

- **finished**: a chunk carried a finish reason and the stream ended with ``[DONE]``;
- **refused**: the server said no in words: HTTP 429 or 503, or an error event in the stream;
- **lost**: anything else — a transport error (connection refused or reset, a read that hung past
  the client timeout), another HTTP status, or a stream that ended without a finish reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

REFUSAL_STATUSES = (429, 503)


@dataclass
class StreamTiming:
    """What the client saw of one streamed request.

    ``token_times`` (``perf_counter``) and ``wall_times`` (``time.time()``, comparable with a
    worker's stamp on the same host) hold one entry per token where the chunks say which tokens
    they carry (logprobs asked: ``stream_completion(every_token=True)``), else one per chunk that
    carried text; the final empty chunk that only carries the finish reason is not a token.
    """

    token_times: list[float]
    ok: bool
    error: str = ""
    sent_at: float = 0.0
    status: int = 0  # HTTP status (0: no response)
    finish_reason: str | None = None
    error_event: bool = False  # the stream carried an explicit error event
    request_id: str = ""  # the gateway's id of the request (the chunks' "id")
    wall_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent_at if self.token_times else None


def classify(result: StreamTiming) -> str:
    """finished | refused | lost, as defined in the module docstring."""
    if result.ok and result.finish_reason is not None:
        return "finished"
    if result.status in REFUSAL_STATUSES:
        return "refused"
    if result.status == 200 and result.error_event:
        return "refused"
    return "lost"


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def stream_completion(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
    headers: dict[str, str] | None = None, every_token: bool = False,
) -> StreamTiming:  # fmt: skip
    """One streamed /v1/completions request (token-id prompt, greedy, ``ignore_eos``); the arrival
    time of each text-bearing chunk, or with ``every_token`` of each token: the request then asks
    for the chosen tokens' logprobs (``logprobs: 0``), so a token whose text the detokenizer
    still holds back (part of a multi-byte character) comes in a chunk of its own, and the k-th
    time is the k-th token's, which per-token deadlines and pairing by index need."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    if every_token:
        body["logprobs"] = 0
    timing = StreamTiming([], False, sent_at=time.perf_counter())
    try:
        async with client.stream(
            "POST", f"{url}/v1/completions", json=body, headers=headers
        ) as response:
            timing.status = response.status_code
            if timing.status != 200:
                text = (await response.aread()).decode(errors="replace")
                timing.error = f"HTTP {timing.status}: {text[:200]}"
                return timing
            done = await _read_events(response, timing)
    except (httpx.HTTPError, httpx.StreamError, ValueError) as exc:  # ValueError: not JSON
        timing.error = f"{type(exc).__name__}: {exc}"
        return timing
    if timing.error_event:
        return timing
    if not done:
        timing.error = "stream ended without [DONE]"
    elif timing.finish_reason is None:
        timing.error = "stream ended without a finish reason"
    timing.ok = done and timing.finish_reason is not None
    return timing


async def _read_events(response: httpx.Response, timing: StreamTiming) -> bool:
    """Consume the SSE lines into ``timing``; True when ``[DONE]`` came."""
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            return True
        chunk = json.loads(line[6:])
        if "error" in chunk:
            timing.error_event = True
            timing.error = str(chunk["error"])
            return False
        timing.request_id = timing.request_id or str(chunk.get("id", ""))
        choices = chunk.get("choices") or []
        if not choices:
            continue  # the usage chunk
        logprobs = choices[0].get("logprobs")
        tokens = len(logprobs["tokens"]) if logprobs else int(bool(choices[0].get("text")))
        if tokens:
            timing.token_times.extend([time.perf_counter()] * tokens)
            timing.wall_times.extend([time.time()] * tokens)
        if choices[0].get("finish_reason") is not None:
            timing.finish_reason = choices[0]["finish_reason"]
    return False
