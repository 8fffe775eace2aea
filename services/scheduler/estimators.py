"""Step-time and switch-time estimators (DESIGN.md §6): fitted linear models per model and device.

- prefill of a group with prompt lengths l_j:  ``a + b·Σ l_j + c·Σ l_j²``  (c: attention, which is
  quadratic in each sequence's own length, hence the sum of squares)
- one decode step over context lengths l_j:   ``a + b·Σ l_j + c·batch``
- switch:                                      ``weight_bytes / link bandwidth + fixed``
- KV move (swap, prefill → decode handoff):    ``tokens · kv_bytes_per_token / link bandwidth``
- exposed switch (what a turn really waits for once prefetch has copied what it could): measured
  online, an EWMA per model of the seconds workers report (:meth:`Estimator.observe_switch`)
- learned online: each model's prefill, decode and full-switch predictions are scaled by an EWMA
  of measured / predicted from the times workers report (:func:`observe_turn`,
  :meth:`Estimator.observe_switch`), so a roofline default converges to the device it runs on
  and a profile stays true when the machine's load changes it

Profiles come from ``aegaeon profile`` (a JSON file, fitted here by :func:`fit_linear` etc. from
the samples it measured) or, where none exists, from the roofline model of
:mod:`aegaeon.sim.hardware`. Everything here is pure except :meth:`Estimator.save` /
:func:`load_estimator`, which read and write the JSON file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aegaeon.scheduler.policies.base import ModelSpec, RequestView, TurnPlan, TurnResult

Coeffs = tuple[float, float, float]


@dataclass
class ModelProfile:
    """Fitted costs of one model on one device."""

    prefill: Coeffs  # a [s], b [s/token], c [s/token²]
    decode: Coeffs  # a [s], b [s/context token], c [s/request]
    switch_fixed_s: float
    link_bytes_per_s: float
    weight_bytes: int
    kv_bytes_per_token: int


SWITCH_EWMA_WEIGHT = 0.2
"""Weight of the newest exposed-switch sample: about the last five switches of a model count."""
SCALE_EWMA_WEIGHT = 0.2
"""Weight of the newest measured/predicted ratio of a model's prefill, decode or switch time."""
TURN_OVERHEAD_PRIOR_S = 0.0005
"""A turn's control round trip before any is measured: a RunTurn answered by TurnDone over a real
nats-server on the 2-core development CPU (the simulator charges it per turn)."""
SCALE_STEP_BOUND = 10.0
"""A sample counts as at most this many times (or this fraction of) the current scale: one wild
sample (a stall, a clock jump) cannot throw a learned scale far."""


class Estimator:
    """Predicted engine times for every model on one device (implements StepTimeEstimator)."""

    def __init__(
        self, profiles: dict[str, ModelProfile], device: str = "cpu",
        measured: Iterable[str] | None = None,
    ) -> None:  # fmt: skip
        self.profiles = profiles
        self.device = device
        # The profiles measured by ``aegaeon profile`` (default: all given); the others are
        # roofline defaults, dropped with what was learned when their model is removed.
        self.measured = set(profiles if measured is None else measured)
        self.exposed_s: dict[str, float] = {}  # model → EWMA of measured exposed switch seconds
        self.copied_bytes = 0  # over all observed switches: copied while a turn waited
        self.prefetched_bytes = 0  # … and copied in the background before
        self.scales: dict[tuple[str, str], float] = {}  # (kind, model) → measured / predicted
        self.turn_overhead = TURN_OVERHEAD_PRIOR_S  # EWMA of a turn's control round trip

    def add_model(self, spec: ModelSpec) -> None:
        """A model registered after start (or registered again with other weights): the
        roofline default for it until its measurements scale it (a profile's entry of the
        same size is kept)."""
        known = self.profiles.get(spec.name)
        if known is None or (known.weight_bytes, known.kv_bytes_per_token) != (
            spec.weight_bytes, spec.kv_bytes_per_token,
        ):  # fmt: skip
            from aegaeon.sim.hardware import roofline_profile

            self.profiles[spec.name] = roofline_profile(spec, self.device)
            self.measured.discard(spec.name)

    def remove_model(self, name: str) -> None:
        """``name`` was removed from the registry: forget what was learned of it (a model
        market's names come and go; nothing is kept per name ever deployed). A measured
        profile stays, for the model's return."""
        self.exposed_s.pop(name, None)
        for key in [k for k in self.scales if k[1] == name]:
            del self.scales[key]
        if name not in self.measured:
            self.profiles.pop(name, None)

    def _scale(self, kind: str, model: str) -> float:
        return self.scales.get((kind, model), 1.0)

    def _learn(self, kind: str, model: str, measured_s: float, predicted_s: float) -> None:
        """Move the (kind, model) scale towards ``measured_s / predicted_s`` (unscaled)."""
        if measured_s <= 0 or predicted_s <= 0:
            return
        ratio = measured_s / predicted_s
        key = (kind, model)
        old = self.scales.get(key)
        if old is None:
            self.scales[key] = ratio
            return
        ratio = min(old * SCALE_STEP_BOUND, max(old / SCALE_STEP_BOUND, ratio))
        self.scales[key] = old + SCALE_EWMA_WEIGHT * (ratio - old)

    def _prefill_raw(self, model: str, prompt_lens: list[int]) -> float:
        a, b, c = self.profiles[model].prefill
        return a + b * sum(prompt_lens) + c * sum(n * n for n in prompt_lens)

    def _decode_raw(self, model: str, total_context: int, batch: int) -> float:
        a, b, c = self.profiles[model].decode
        return a + b * total_context + c * batch

    def _switch_raw(self, model: str) -> float:
        p = self.profiles[model]
        return p.switch_fixed_s + p.weight_bytes / p.link_bytes_per_s

    def prefill_time(self, model: str, prompt_lens: list[int]) -> float:
        return self._scale("prefill", model) * self._prefill_raw(model, prompt_lens)

    def decode_time(self, model: str, context_lens: list[int]) -> float:
        return self.decode_time_sum(model, sum(context_lens), len(context_lens))

    def decode_time_sum(self, model: str, total_context: int, batch: int) -> float:
        """One decode step from the batch's total context and size (the simulator's fast path)."""
        return self._scale("decode", model) * self._decode_raw(model, total_context, batch)

    def switch_time(self, model: str) -> float:
        """A switch that copies every byte (nothing prefetched)."""
        return self._scale("switch", model) * self._switch_raw(model)

    def observe_steps(
        self, model: str, *, prefill: tuple[list[int], float] | None = None,
        decode: tuple[list[int], float] | None = None,
    ) -> None:  # fmt: skip
        """A worker measured a prefill step over these prompt lengths, or one decode step (the
        mean of a turn's) over these context lengths, taking these seconds."""
        if prefill is not None and prefill[0]:
            self._learn("prefill", model, prefill[1], self._prefill_raw(model, prefill[0]))
        if decode is not None and decode[0]:
            lens = decode[0]
            self._learn("decode", model, decode[1], self._decode_raw(model, sum(lens), len(lens)))

    def observe_turn_overhead(self, seconds: float) -> None:
        """A turn took ``seconds`` beyond what the worker spent in it: the control round trip
        (RunTurn out, TurnDone back, queueing on both sides), which every turn pays."""
        old = self.turn_overhead
        sample = min(old * SCALE_STEP_BOUND, max(0.0, seconds))  # a cold start's first turn
        self.turn_overhead = old + SCALE_EWMA_WEIGHT * (sample - old)

    def turn_overhead_s(self) -> float:
        """The control cost of one turn: the EWMA of what was measured, from the prior."""
        return self.turn_overhead

    def observe_switch(
        self, model: str, exposed_s: float, copied_bytes: int, prefetched_bytes: int
    ) -> None:
        """A switch to ``model`` made the turn wait ``exposed_s``; ``copied_bytes`` were copied
        while it waited, ``prefetched_bytes`` in the background before. Drivers report every
        switch to a model that was not the bound one, including those that found it fully
        prefetched (≈ 0 s): those are what prefetching buys. The estimate is per model, not
        per byte, since what stays exposed depends on how long the turn before it ran, not
        only on the model's size; the bytes feed :meth:`prefetch_hidden_fraction`."""
        exposed_s = max(0.0, exposed_s)
        if copied_bytes > 0 and prefetched_bytes == 0:  # a whole copy waited for: the full cost
            self._learn("switch", model, exposed_s, self._switch_raw(model))
        self.copied_bytes += max(0, copied_bytes)
        self.prefetched_bytes += max(0, prefetched_bytes)
        previous = self.exposed_s.get(model)
        self.exposed_s[model] = (
            exposed_s
            if previous is None
            else (1 - SWITCH_EWMA_WEIGHT) * previous + SWITCH_EWMA_WEIGHT * exposed_s
        )

    def exposed_switch_time(self, model: str) -> float | None:
        """Measured exposed switch time of ``model`` (seconds), or None before any switch to it
        was observed: the policy then keeps its prefetch model of the switch
        (:func:`aegaeon.scheduler.policies.quota.prefetched_round_quotas`)."""
        return self.exposed_s.get(model)

    def prefetch_hidden_fraction(self) -> float | None:
        """Share of observed switch bytes copied in the background (None before any)."""
        total = self.copied_bytes + self.prefetched_bytes
        return self.prefetched_bytes / total if total else None

    def kv_move_time(self, model: str, tokens: int) -> float:
        p = self.profiles[model]
        return tokens * p.kv_bytes_per_token / p.link_bytes_per_s

    def to_json(self) -> dict:
        return {"device": self.device, "models": {k: asdict(v) for k, v in self.profiles.items()}}

    @classmethod
    def from_json(cls, data: dict) -> Estimator:
        profiles = {}
        for name, raw in data["models"].items():
            raw = dict(raw)
            raw["prefill"] = tuple(raw["prefill"])
            raw["decode"] = tuple(raw["decode"])
            profiles[name] = ModelProfile(**raw)
        return cls(profiles, data.get("device", "cpu"))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2))


def observe_turn(
    estimator: Any, plan: TurnPlan, requests: Mapping[str, RequestView], result: TurnResult,
    round_trip_s: float,
) -> None:  # fmt: skip
    """Feed ``estimator`` (when it learns: ``observe_steps``) what a turn measured. Drivers
    call it after each turn, before the policy's ``turn_done`` moves the requests' contexts on:
    the turn's control round trip (dispatched → ended, less the worker's own time), the
    prefill of a prefill-only turn over its requests' prompts, and the mean decode step over
    the batch's contexts at the middle of the turn. Every policy's estimator learns the same
    way, live (the scheduler service) and simulated."""
    observe = getattr(estimator, "observe_steps", None)
    if observe is None:
        return
    estimator.observe_turn_overhead(round_trip_s)
    views = [requests[r] for r in plan.request_ids if r in requests]
    if plan.prefill_only:
        prompts = [v.prompt_len for v in views if not v.prefilled]
        if prompts and result.prefill_s > 0:
            observe(plan.model, prefill=(prompts, result.prefill_s))
    elif result.decode_steps >= 2 and result.decode_s > 0:
        middle = result.decode_steps // 2
        contexts = [v.context_len + middle for v in views]
        if contexts:
            observe(plan.model, decode=(contexts, result.decode_s / result.decode_steps))


def load_estimator(
    path: str | None, models: dict[str, ModelSpec], *, device: str = "cpu"
) -> Estimator:
    """Profiles from ``path`` when it exists; a roofline default for ``device`` for every model
    the file lacks (or for all of them without a file)."""
    from aegaeon.sim.hardware import roofline_profile

    base = Estimator({}, device)
    if path and Path(path).exists():
        base = Estimator.from_json(json.loads(Path(path).read_text()))
    profiles = dict(base.profiles)
    for name, spec in models.items():
        if name not in profiles:
            profiles[name] = roofline_profile(spec, base.device)
    return Estimator(profiles, base.device, measured=base.profiles)


# ---------------------------------------------------------------- fitting (pure)


def fit_linear(features: np.ndarray, seconds: np.ndarray) -> Coeffs:
    """Least squares with three non-negative coefficients (a cost never falls with size).

    A negative coefficient is dropped and the rest refitted, the usual active-set step.
    """
    active = [0, 1, 2]
    coeffs = np.zeros(3)
    while active:
        sol, *_ = np.linalg.lstsq(features[:, active], seconds, rcond=None)
        if (sol >= 0).all():
            coeffs[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return float(coeffs[0]), float(coeffs[1]), float(coeffs[2])


def fit_prefill(samples: Sequence[tuple[Sequence[int], float]]) -> Coeffs:
    """Fit ``a + b·Σl + c·Σl²`` to (prompt lengths, seconds) samples."""
    x = np.array([[1.0, sum(lens), sum(n * n for n in lens)] for lens, _ in samples])
    return fit_linear(x, np.array([s for _, s in samples]))


def fit_decode(samples: Sequence[tuple[Sequence[int], float]]) -> Coeffs:
    """Fit ``a + b·Σl + c·batch`` to (context lengths, seconds) samples."""
    x = np.array([[1.0, sum(lens), len(lens)] for lens, _ in samples])
    return fit_linear(x, np.array([s for _, s in samples]))


def fit_switch(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """Fit ``fixed + bytes/bandwidth`` to (bytes, seconds) samples → (fixed_s, bytes_per_s)."""
    x = np.array([[1.0, b, 0.0] for b, _ in samples])
    fixed, per_byte, _ = fit_linear(x, np.array([s for _, s in samples]))
    return fixed, (1.0 / per_byte if per_byte > 0 else float("inf"))
