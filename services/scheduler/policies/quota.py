"""SLO-derived time quotas of weighted round-robin decode (DESIGN.md §6, Algorithm 2). Pure.

For batch *i* with estimated step time ``t_i``: ``n_i = TBT / t_i`` (steps it may take per TBT).
With ``c`` the switch time spent in one round and ``S = Σ 1/n_i``::

    α   = max( c / (min_i n_i · QMAX) + S , 0.5 )
    q_i = c / ( n_i · (α − S) )

Then every batch gets ``q_i / t_i`` tokens per round of length ``c + Σ q`` = ``c·α/(α − S)``,
which is ``1/α`` of the tokens its TBT schedule asks for: α ≤ 1 keeps every batch on schedule,
α > 1 means overload with TBT ≈ α·SLO. The 0.5 floor keeps quotas from growing without bound
when the load is light; ``min n · QMAX`` caps the longest quota at QMAX.
"""

from __future__ import annotations

from collections.abc import Sequence

QMAX_S = 4.0
ALPHA_FLOOR = 0.5


def round_alpha(step_times: Sequence[float], round_switch_s: float, tbt_s: float) -> float:
    """α of a round (see the module docstring)."""
    n = [tbt_s / t for t in step_times]
    s = sum(1.0 / x for x in n)
    return max(round_switch_s / (min(n) * QMAX_S) + s, ALPHA_FLOOR)


def round_quotas(
    step_times: Sequence[float], round_switch_s: float, tbt_s: float
) -> tuple[float, list[float]]:
    """(α, quota of each batch) for one round. Without switch time to amortize (a single
    model), there is nothing to trade, and every batch may run the longest quota."""
    if not step_times:
        return ALPHA_FLOOR, []
    alpha = round_alpha(step_times, round_switch_s, tbt_s)
    if round_switch_s <= 0:
        return alpha, [QMAX_S] * len(step_times)
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
    models: Sequence[str], switch_s: dict[str, float], quotas: Sequence[float]
) -> list[float]:
    """Switch time left to pay for each batch when its model was prefetched during the turn
    before it (the previous batch's quota): ``max(fraction·switch, switch − previous quota)``."""
    full = cyclic_switch_costs(models, switch_s)
    return [
        0.0 if s == 0 else max(PREFETCH_EXPOSED_FRACTION * s, s - quotas[i - 1])
        for i, s in enumerate(full)
    ]


def prefetched_round_quotas(
    models: Sequence[str],
    step_times: Sequence[float],
    switch_s: dict[str, float],
    tbt_s: float,
    kv_move_s: float = 0.0,
) -> tuple[float, list[float], float]:
    """(α, quotas, c) with c the switch time a round really pays when each next model is
    prefetched during the current turn, plus ``kv_move_s`` (the round's KV swaps, which
    prefetching does not hide). Quotas depend on c and c on the quotas, so a few damped
    fixed-point steps settle it, starting from the full (unhidden) switch times."""
    c = sum(cyclic_switch_costs(models, switch_s))
    if c <= 0:
        return (*round_quotas(step_times, c, tbt_s), c)
    c += kv_move_s
    alpha, quotas = round_quotas(step_times, c, tbt_s)
    for _ in range(6):
        c = 0.5 * (c + kv_move_s + sum(exposed_switch_costs(models, switch_s, quotas)))
        alpha, quotas = round_quotas(step_times, c, tbt_s)
    return alpha, quotas, c
