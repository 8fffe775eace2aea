"""The gateway's core: its connections and the admission path of a request.

``open()`` runs the checks in the order that sheds load cheapest first: ``n`` choices more than
the in-flight bounds ever admit (400), admission, in all and per key (503), the key's request
rate (429), model (404; not ready: 503 loading, 409 draining or failed), tokenization and
context (400/413), the key's token rate (429), then the Redis record and the submit of each
choice. Any failure releases what was taken, so a refused request leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis.asyncio as aioredis

from aegaeon.bus import Bus, connect_redis
from aegaeon.lifecycle import serving_refusal
from aegaeon.protocol import ModelInfo
from aegaeon.state import Keys

from .auth import ApiKey, AuthError, KeyStore
from .cluster import ClusterView, ModelDirectory
from .errors import APIError, bad_request
from .generation import Generation, Services
from .limits import Admission, RateLimiter
from .openai_types import ChatCompletionRequest, CompletionRequest
from .prepare import (
    Kind,
    Prepared,
    check_consistent,
    check_supported,
    choices,
    max_new_tokens,
    new_request_id,
    prompt_count,
    prompts,
    sampling_params,
)
from .settings import GatewaySettings
from .streams import Recorded, StreamRouter
from .tokenization import ModelTokenizer, TokenizerCache

log = logging.getLogger(__name__)

WARM_TOKENIZERS = 64
"""Tokenizers loaded at start-up; a larger registry loads the rest on first use."""


class Gateway:
    """Connections (NATS, Redis), views of the cluster, keys and limits. ``start()``/``stop()``."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.keystore = KeyStore.load(settings.api_keys_file)
        self.limiter = RateLimiter()
        self.admission = Admission(settings.max_in_flight, settings.per_key_in_flight)
        self.router = StreamRouter(self.recorded)
        self.cluster = ClusterView()
        self.keys = Keys(settings.bus.prefix)
        self._bus: Bus | None = None
        self._redis: aioredis.Redis | None = None
        self._models: ModelDirectory | None = None
        self._tokenizers: TokenizerCache | None = None
        self._warming: asyncio.Task | None = None

    async def start(self) -> None:
        s = self.settings
        self._bus = await Bus.connect(s.bus, name=f"gateway-{s.gateway_id}")
        self._redis = connect_redis(s.bus, max_connections=64)
        await self.router.start(self._bus, s.gateway_id)
        self._bus.reconnect_listeners.append(self.router.on_reconnect)
        await self.cluster.start(self._bus)
        self._tokenizers = TokenizerCache(self._bus, s.tokenizer_cache_dir)
        self._models = ModelDirectory(
            self._bus, ttl_s=s.models_ttl_s, on_removed=self._tokenizers.forget
        )
        await self._models.watch()
        self._warming = asyncio.create_task(self._warm_tokenizers())

    async def _warm_tokenizers(self) -> None:
        """Load tokenizers before the first request needs them (the first load imports
        transformers: seconds that would otherwise land on someone's time to first token)."""
        try:
            models = await self.models.all()
        except Exception:
            return  # the model-store is not up yet; requests load tokenizers on demand
        for info in models[:WARM_TOKENIZERS]:
            with contextlib.suppress(Exception):
                await self.tokenizer(info)

    async def stop(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
            with contextlib.suppress(BaseException):
                await self._warming
        await self.router.stop()
        await self.cluster.stop()
        if self._models is not None:
            await self._models.stop()
        if self._bus is not None:
            await self._bus.close()
        if self._redis is not None:
            await self._redis.aclose()

    @property
    def bus(self) -> Bus:
        assert self._bus is not None, "gateway not started"
        return self._bus

    @property
    def redis(self) -> aioredis.Redis:
        assert self._redis is not None, "gateway not started"
        return self._redis

    @property
    def models(self) -> ModelDirectory:
        assert self._models is not None, "gateway not started"
        return self._models

    # ------------------------------------------------------------ checks

    def authenticate(self, authorization: str | None) -> ApiKey:
        try:
            return self.keystore.authenticate(authorization)
        except AuthError as exc:
            raise APIError(401, str(exc), code="invalid_api_key") from None

    async def registry(self) -> list[ModelInfo]:
        try:
            return await self.models.all()
        except Exception as exc:
            raise APIError(503, "The model registry is not reachable.", retry_after=1.0) from exc

    async def resolve(self, name: str, key: ApiKey) -> ModelInfo:
        try:
            info = await self.models.get(name)
        except Exception as exc:
            raise APIError(503, "The model registry is not reachable.", retry_after=1.0) from exc
        if info is None or not key.allows(name):
            # Same answer for "absent" and "not yours": a key cannot probe other keys' models.
            raise APIError(
                404,
                f"The model '{name}' does not exist or you do not have access to it.",
                code="model_not_found",
                param="model",
            )
        return info

    @staticmethod
    def check_serving(info: ModelInfo) -> None:
        """Refuse a request of a model that is not ready (loading, draining, failed)."""
        refusal = serving_refusal(info.name, info.state, info.state_reason)
        if refusal is not None:
            raise APIError(
                refusal.status, refusal.message, code=refusal.code, param="model",
                retry_after=refusal.retry_after,
            )  # fmt: skip

    async def tokenizer(self, info: ModelInfo) -> ModelTokenizer:
        assert self._tokenizers is not None, "gateway not started"
        try:
            return await self._tokenizers.get(info)
        except Exception as exc:
            log.exception("tokenizer of %s failed to load", info.name)
            raise APIError(503, f"The tokenizer of '{info.name}' is not available.") from exc

    # ------------------------------------------------------------ the path of a request

    async def open(
        self, kind: Kind, body: ChatCompletionRequest | CompletionRequest, key: ApiKey
    ) -> list[Generation]:
        """Admit, check, record and submit each choice (``n`` per prompt, each taking an
        admission slot of its own). Raises APIError with nothing left behind."""
        n, batch = body.n or 1, prompt_count(body)
        count = batch * n
        slot = self._admission_key(key.name)
        self._check_choices(batch, n, slot, key)
        refusal = self.admission.refusal(slot, key.limit.max_in_flight, count=count)
        if refusal is not None:
            raise APIError(503, refusal, retry_after=self.admission.retry_after_s)
        for _ in range(count):
            self.admission.admit(slot)
        generations: list[Generation] = []
        planned: list[Prepared] = []  # every choice, once their token budget is charged
        try:
            self._charge_request(key)  # before the body costs tokenization
            prepared = await self.prepare(kind, body, key)
            self._charge_tokens(key, prepared, n)
            planned = choices(prepared, n)
            for choice in planned:
                generations.append(Generation(self._services(), choice, key.name))
                await generations[-1].submit()
            return generations
        except BaseException:
            for generation in generations:
                await generation.close()  # releases its admission slot and refunds its tokens
            for _ in range(count - len(generations)):
                self.admission.release(slot)
            unopened = sum(c.sampling.max_tokens for c in planned[len(generations) :])
            if unopened:
                self.limiter.refund(key.name, unopened, time.monotonic())
            raise

    def _check_choices(self, prompts: int, n: int, slot: str | None, key: ApiKey) -> None:
        """Choices (``n`` per prompt) that the in-flight bounds could never admit together are
        a 400 (a retry would get the same 503 for ever)."""
        count = prompts * n
        cap = self.admission.key_cap(slot, key.limit.max_in_flight)
        most = min(self.admission.max_in_flight, cap if cap is not None else count)
        if count > most:
            asked = f"{prompts} prompts × n = {n}" if prompts > 1 else f"n = {n}"
            raise bad_request(
                f"{count} choices ({asked}) are more than this server runs at once for one "
                f"caller (at most {most}).",
                param="n",
            )

    async def prepare(
        self, kind: Kind, body: ChatCompletionRequest | CompletionRequest, key: ApiKey
    ) -> list[Prepared]:
        """One Prepared per prompt (a completion may hold a batch), under one request id."""
        check_supported(body)
        check_consistent(body)
        info = await self.resolve(body.model, key)
        self.check_serving(info)
        tok = await self.tokenizer(info)
        request_id = new_request_id(kind)
        created = int(time.time())
        stream = bool(body.stream)
        include_usage = stream and bool(body.stream_options and body.stream_options.include_usage)
        limit = self.settings.max_prompt_tokens
        out = []
        for index, ids in enumerate(await prompts(body, tok)):
            if limit is not None and len(ids) > limit:
                raise APIError(
                    413,
                    f"The prompt has {len(ids)} tokens; this server accepts at most {limit}.",
                    code="prompt_too_long",
                )
            sampling = sampling_params(body, max_new_tokens(body, len(ids), info.context_length), tok)  # fmt: skip
            out.append(Prepared(
                kind=kind, request_id=request_id, model=info, tokenizer=tok, prompt_ids=ids,
                sampling=sampling, stops=body.stop_strings(), stream=stream,
                include_usage=include_usage, top_logprobs=sampling.logprobs, created=created,
                prompt_index=index,
            ))  # fmt: skip
        return out

    def _charge_request(self, key: ApiKey) -> None:
        """The request itself (rpm), charged before the prompt is tokenized."""
        self._raise_if_waiting(
            key, self.limiter.acquire_request(key.name, key.limit, time.monotonic())
        )

    def _charge_tokens(self, key: ApiKey, prepared: list[Prepared], n: int = 1) -> None:
        """Each prompt, and its max_tokens for each of its ``n`` choices (tpm): the most the
        request can cost (a prompt once, as OpenAI counts it); each choice's unused part comes
        back."""
        cost = sum(len(p.prompt_ids) + n * p.sampling.max_tokens for p in prepared)
        self._raise_if_waiting(
            key, self.limiter.acquire_tokens(key.name, key.limit, cost, time.monotonic())
        )

    @staticmethod
    def _raise_if_waiting(key: ApiKey, wait: float | None) -> None:
        if wait is not None:
            raise APIError(
                429,
                f"Rate limit reached for key '{key.name}'; try again in {wait:.1f} s.",
                code="rate_limit_exceeded",
                retry_after=wait,
            )

    async def recorded(self, request_id: str, start: int) -> Recorded:
        """What Redis holds of a request's output from index ``start`` (the worker's record of
        what it sent), and how it ended, if it has."""
        async with self.redis.pipeline(transaction=True) as pipe:  # one round trip, one moment
            pipe.hmget(self.keys.request(request_id), ["finish_reason", "output_len"])
            pipe.lrange(self.keys.output_tokens(request_id), start, -1)
            meta, tokens = await pipe.execute()
        reason, output_len = (v.decode() if isinstance(v, bytes) else v for v in meta)
        return Recorded([int(t) for t in tokens], reason, int(output_len) if output_len else None)

    def _services(self) -> Services:
        s = self.settings
        return Services(
            bus=self.bus,
            redis=self.redis,
            router=self.router,
            keys=self.keys,
            gateway_id=s.gateway_id,
            submit_timeout_s=s.submit_timeout_s,
            idle_timeout_s=s.idle_timeout_s,
            send_timeout_s=s.send_timeout_s,
            on_close=self._on_close,
        )

    def _admission_key(self, name: str) -> str | None:
        """The key admission bounds per key: real keys only (open access is one anonymous
        caller, bounded by the total)."""
        return None if self.keystore.open_access else name

    def _on_close(self, generation: Generation) -> None:
        self.admission.release(self._admission_key(generation.api_key))
        unused = generation.p.sampling.max_tokens - generation.timings.output_tokens
        self.limiter.refund(generation.api_key, unused, time.monotonic())
