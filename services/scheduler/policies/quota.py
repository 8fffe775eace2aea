"""SLO-derived time quotas of weighted round-robin decode (DESIGN.md §6, Algorithm 2). Pure.

For batch *i* with estimated step time ``t_i``: ``n_i = TBT / t_i`` (steps it may take per TBT).
With ``c`` the switch time spent in one round and ``S = Σ 1/n_i``::

    α   = max( c / (min_i n_i · QMAX) + S , 0.5 )
    q_i = c / ( n_i · (α − S) )

Then every batch gets ``q_i / t_i`` tokens per round of length ``c + Σ q`` = ``c·α/(α − S)``,
which is ``1/α`` of the tokens its TBT schedule asks for: α ≤ 1 keeps every batch on schedule,
α > 1 means overload with TBT ≈ α·SLO. The 0.5 floor keeps quotas from growing without bound
when the load is light; ``min n · QMAX`` caps the longest quota at QMAX.

``c`` is the switch time a round really pays. Where workers have reported switches, it is their
measured exposed time per model (``Estimator.exposed_switch_time``); for a model not yet
observed, the prefetch model below stands in: the previous turn hides up to its quota of the
copy, and PREFETCH_EXPOSED_FRACTION of a switch (rebinding, synchronisation) is never hidden.
"""

from __future__ import annotations

from collections.abc import Sequence

QMAX_S = 4.0
QMAX_TTFT_SHARE = 0.4
"""The paper's QMAX (4 s) is 0.4 of its TTFT target (10 s). The cap keeps that proportion
(:func:`qmax_for`): under a tighter TTFT target a 4 s quota would let one turn outlast the whole
budget of the group waiting behind it."""
ALPHA_FLOOR = 0.5
ROUND_SHARE = 0.5
"""A round (switches + quotas) lasts at most this share of the TTFT target: see capped_round."""


def qmax_for(ttft_s: float) -> float:
    """The longest quota under a TTFT target: QMAX_S, or QMAX_TTFT_SHARE of a tighter target."""
    return min(QMAX_S, QMAX_TTFT_SHARE * ttft_s)


def round_alpha(
    step_times: Sequence[float], round_switch_s: float, tbt_s: float, qmax_s: float = QMAX_S
) -> float:
    """α of a round (see the module docstring)."""
    n = [tbt_s / t for t in step_times]
    s = sum(1.0 / x for x in n)
    return max(round_switch_s / (min(n) * qmax_s) + s, ALPHA_FLOOR)


def round_quotas(
    step_times: Sequence[float], round_switch_s: float, tbt_s: float, qmax_s: float = QMAX_S
) -> tuple[float, list[float]]:
    """(α, quota of each batch) for one round. Without switch time to amortize (a single
    model), there is nothing to trade, and every batch may run the longest quota."""
    if not step_times:
        return ALPHA_FLOOR, []
    alpha = round_alpha(step_times, round_switch_s, tbt_s, qmax_s)
    if round_switch_s <= 0:
        return alpha, [qmax_s] * len(step_times)
    s = sum(t / tbt_s for t in step_times)
    return alpha, [round_switch_s * t / (tbt_s * (alpha - s)) for t in step_times]


def cyclic_switch_costs(models: Sequence[str], switch_s: dict[str, float]) -> list[float]:
    """Switch time paid to enter each batch of a rotation: none when the batch before it
    (cyclically) serves the same model."""
    if len(models) <= 1:
        return [0.0] * len(models)
    return [0.0 if models[i - 1] == m else switch_s[m] for i, m in enumerate(models)]


PREFETCH_EXPOSED_FRACTION = 0.15  # of a switch that prefetching never hides (rebinding, sync)


def exposed_switch_costs(
    models: Sequence[str],
    switch_s: dict[str, float],
    quotas: Sequence[float],
    measured: dict[str, float] | None = None,
) -> list[float]:
    """Switch time left to pay for each batch: the measured exposed time of its model where
    known, else, its model being prefetched during the turn before it (the previous batch's
    quota), ``max(fraction·switch, switch − previous quota)``."""
    full = cyclic_switch_costs(models, switch_s)
    known = measured or {}
    return [
        0.0 if s == 0
        else known[models[i]] if models[i] in known
        else max(PREFETCH_EXPOSED_FRACTION * s, s - quotas[i - 1])
        for i, s in enumerate(full)
    ]  # fmt: skip


def prefetched_round_quotas(
    models: Sequence[str],
    step_times: Sequence[float],
    switch_s: dict[str, float],
    tbt_s: float,
    kv_move_s: float = 0.0,
    measured: dict[str, float] | None = None,
    qmax_s: float = QMAX_S,
) -> tuple[float, list[float], float]:
    """(α, quotas, c) with c the switch time a round really pays, plus ``kv_move_s`` (the
    round's KV swaps, which prefetching does not hide). ``measured``: exposed switch times
    workers reported, per model. For the others, each next model is prefetched during the
    current turn: quotas depend on c and c on the quotas, so a few damped fixed-point steps
    settle it, starting from the full (unhidden) switch times."""
    if sum(cyclic_switch_costs(models, switch_s)) <= 0:
        return (*round_quotas(step_times, 0.0, tbt_s, qmax_s), 0.0)
    known = measured or {}
    # With no quota before it yet, an unmeasured switch is paid in full: the starting point.
    c = kv_move_s + sum(exposed_switch_costs(models, switch_s, [0.0] * len(models), known))
    alpha, quotas = round_quotas(step_times, c, tbt_s, qmax_s)
    if all(m in known for m in models):
        return alpha, quotas, c  # measured: c does not depend on the quotas
    for _ in range(6):
        exposed = exposed_switch_costs(models, switch_s, quotas, known)
        c = 0.5 * (c + kv_move_s + sum(exposed))
        alpha, quotas = round_quotas(step_times, c, tbt_s, qmax_s)
    return alpha, quotas, c


def capped_round(
    quotas: Sequence[float],
    step_times: Sequence[float],
    round_switch_s: float,
    tbt_s: float,
    cap_s: float,
) -> tuple[list[float], float | None]:
    """Quotas scaled down together (keeping their ratios) so that a round, ``c + Σ q``, lasts
    at most ``cap_s`` — but never shorter than ``c / (1 − S)``, the shortest round in which
    every batch still gets the tokens its TBT asks for (α = 1). Returns the quotas and, when
    they were scaled, the α they leave: the largest ratio, over batches, of the tokens the
    round's length asks of a batch (``round / TBT``) to the tokens its quota gives (``q / t``).

    Why a cap: a batch waits the rest of the round between two of its turns. α ≤ 1 makes each
    turn bank enough slack for the next wait, but a request reaching a decode instance brings
    only what is left of its TTFT budget, and on a "both" instance a round also delays the
    first tokens of the groups waiting there. Near saturation (α − S small) Algorithm 2's
    round, ``c·α / (α − S)``, grows to N · QMAX, and that first wait breaks the token schedule
    whatever α says. ROUND_SHARE of the TTFT target bounds it, assuming the prefill took at
    most the other half. Why the floor: a shorter round spends a larger share on switching,
    and below ``c / (1 − S)`` every batch would fall behind its schedule on every round; a lane
    at S ≥ 1 (or α > 1) is overloaded and keeps Algorithm 2's quotas.
    """
    total = sum(quotas)
    if not quotas or round_switch_s + total <= cap_s:
        return list(quotas), None
    s = sum(t / tbt_s for t in step_times)
    if s >= 1:
        return list(quotas), None
    shortest = round_switch_s / (1 - s)
    room = max(cap_s, shortest) - round_switch_s
    if room >= total:
        return list(quotas), None
    capped = [max(q * room / total, t) for q, t in zip(quotas, step_times, strict=True)]
    length = round_switch_s + sum(capped)
    alpha = max(length * t / (tbt_s * q) for q, t in zip(capped, step_times, strict=True))
    return capped, alpha
