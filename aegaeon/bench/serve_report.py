"""Results of ``bench serve``: goodput and its ratios, simulator agreement, the summary table and
the plot (attainment against rate, one line per policy; TTFT and TBT CDFs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from aegaeon.slo_metrics import RequestRecord, goodput, latencies


def policy_goodput(points: list[dict], key: str = "attainment") -> float:
    """:func:`aegaeon.slo_metrics.goodput` over a sweep's points, in the view ``key``."""
    return goodput((p["rate_per_model"], p[key]) for p in points)


FIGURE_DECIMALS = 6
"""Figures compared against goals are ratios and differences of grid rates and attainments;
rounded to this many decimals, 0.6 / 0.4 is 1.5 and 0.8 − 0.7 is 10 points, not the floats
1.4999999999999998 and 10.000000000000009 that goals of ≥ 1.5 and ≤ 10 would read as missed."""


def _figure(value: float) -> float:
    return round(value, FIGURE_DECIMALS)


def goodput_ratio(ours: float, theirs: float, lowest_rate: float) -> tuple[float | None, float | None]:  # fmt: skip
    """(ratio, lower bound). When the baseline meets the target at no rate its goodput is below
    the lowest rate tried, so only a lower bound ``ours / lowest_rate`` is known. Both are
    rounded (:data:`FIGURE_DECIMALS`)."""
    if theirs > 0:
        return _figure(ours / theirs), None
    if ours > 0:
        return None, _figure(ours / lowest_rate)
    return None, None


def ratio_spread(runs: list[dict], keys: list[str]) -> tuple[float | None, dict[str, float | None]]:
    """Per ratio key: (max − min) / min over the runs, rounded as the ratios are;
    overall: the largest. A key missing from some run but present in another (a baseline that
    passed nowhere once) has no finite spread: None, and the overall spread is None too."""
    by_key: dict[str, float | None] = {}
    for key in keys:
        values = [run.get(key) for run in runs]
        if all(v is None for v in values):
            continue
        if any(v is None or v <= 0 for v in values):
            by_key[key] = None
            continue
        low, high = min(values), max(values)  # type: ignore[type-var]
        by_key[key] = _figure((high - low) / low)  # type: ignore[operator]
    if any(v is None for v in by_key.values()):
        return None, by_key
    return max((v for v in by_key.values() if v is not None), default=None), by_key


def prefetch_hidden_fraction(switches: list[dict]) -> float | None:
    """Share of the bytes switched in that were copied while another model decoded: Σ
    prefetched behind a turn / Σ (prefetched + waited-for); None with no copies. Bytes staged
    on an idle worker (a guess at the next arrival) are background too but hid nothing behind
    a decode: :func:`prefetch_background_fraction` counts them."""
    total = _switched_bytes(switches)
    behind = sum(s["prefetched_bytes"] - s.get("prefetched_idle_bytes", 0) for s in switches)
    return behind / total if total else None


def prefetch_background_fraction(switches: list[dict]) -> float | None:
    """Share of the bytes switched in that no turn waited for (prefetched behind a turn or
    staged while idle); None with no copies."""
    total = _switched_bytes(switches)
    return sum(s["prefetched_bytes"] for s in switches) / total if total else None


def _switched_bytes(switches: list[dict]) -> int:
    return sum(s["prefetched_bytes"] + s["bytes"] for s in switches)


def sim_differences(policies: dict[str, dict]) -> dict[str, float]:
    """Per policy: the largest |simulated − measured| attainment over its rates, in points,
    rounded (:data:`FIGURE_DECIMALS`)."""
    diffs = {}
    for name, result in policies.items():
        gaps = [_figure(abs(p["sim"]["attainment"] - p["attainment"]) * 100)
                for p in result["points"] if "sim" in p]  # fmt: skip
        if gaps:
            diffs[name] = max(gaps)
    return diffs


def _fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}"


HEADLINE_KEYS = (
    "goodput_ratio_vs_request_level", "goodput_ratio_vs_request_level_at_least",
    "goodput_ratio_vs_sllm_plus", "goodput_ratio_vs_sllm_plus_at_least",
    "goodput_ratio_vs_static_mux", "goodput_ratio_vs_static_mux_at_least",
    "goodput_ratio_spread", "sim_vs_measured_max_abs_diff", "prefetch_hidden_fraction",
    "prefetch_background_fraction", "min_requests_per_point",
)  # fmt: skip


def _switch_cell(switches: dict | None) -> str:
    """ "count (wholly / partly / not prefetched)"; older results lack the split."""
    if not switches:
        return "—"
    if "whole" not in switches:
        return str(switches["count"])
    return f"{switches['count']} ({switches['whole']}/{switches['partial']}/{switches['none']})"


def _prefetch_cell(switches: dict) -> str:
    """ "behind a turn (background in all)", the second only where idle staging added to it."""
    behind, background = (
        prefetch_hidden_fraction([switches]),
        prefetch_background_fraction([switches]),
    )
    if background is None or background == behind:
        return _pct(behind)
    return f"{_pct(behind)} ({_pct(background)})"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def print_summary(result: dict, console: Console | None = None) -> None:
    """Each run's table, then the headline figures (of the most pessimistic run)."""
    console = console or Console()
    for run in result.get("runs", [result]):
        print_run(run, console)
    for key in HEADLINE_KEYS:
        if key in result:
            runs = result.get(f"{key}_runs")
            console.print(f"{key}: {result[key]}" + (f"  (runs: {runs})" if runs else ""))


def print_run(result: dict, console: Console) -> None:
    """One row per (policy, rate): every attainment view, latencies, simulator's prediction."""
    slo = result["slo"]
    if slo["ttft_s"] is None:
        console.print("bench serve: no SLO (the calibration failed)")
        return
    table = Table(
        title=f"bench serve — SLO TTFT {slo['ttft_s']:.3f} s, TBT {slo['tbt_s'] * 1e3:.1f} ms "
        f"(TTFT {slo['scale']['ttft']}, TBT ×{slo['scale']['tbt']} isolated "
        f"{result['largest_model']}), "
        f"the same for every policy; device weight budget "
        f"{result['device']['weight_budget_bytes'] / 2**20:.0f} MiB "
        f"({_pct(result['device']['budget_fraction_of_weights'])} of all weights)"
    )
    for col in ("policy", "λ/model", "reqs", "done", "strict", "time-frac", "qos", "sim",
                "TTFT p50", "TTFT p99", "TBT p50 ms", "TBT p99 ms", "switches (pre: all/part/none)", "prefetched: behind a turn (+idle)",
                "errors"):  # fmt: skip
        table.add_column(col, justify="right" if col != "policy" else "left")
    for name, res in result["policies"].items():
        for p in res["points"]:
            sw = p.get("switches")
            hidden = _prefetch_cell(sw) if sw else "—"
            table.add_row(
                name, f"{p['rate_per_model']:g}", str(p["requests"]), str(p["finished"]),
                _pct(p["attainment"]), _pct(p.get("time_fraction_attainment")),
                _pct(p.get("artifact_qos")), _pct(p.get("sim", {}).get("attainment")),
                _fmt(p["ttft_s"]["p50"]), _fmt(p["ttft_s"]["p99"]),
                _fmt(p["tbt_s"]["p50"], 1e3, 0), _fmt(p["tbt_s"]["p99"], 1e3, 0),
                _switch_cell(sw), hidden,
                ", ".join(f"{k}×{v}" for k, v in p["errors"].items()) or "",
            )  # fmt: skip
    console.print(table)
    print_classes(result, console)
    for name, res in result["policies"].items():
        console.print(f"goodput {name}: λ/model {res.get('goodput_rate_per_model')}"
                      + (f"  ({res['error']})" if res.get("error") else ""))  # fmt: skip


def print_classes(result: dict, console: Console) -> None:
    """With priority classes: per policy, rate and class, strict attainment (measured and
    simulated), the longest first-token wait and the share within the maximum wait."""
    priorities = result.get("priorities")
    if not priorities:
        return
    table = Table(title=f"by priority class — classes {priorities['classes']}, maximum wait "
                        f"{_fmt(priorities['max_wait_s'])} s")  # fmt: skip
    for col in ("policy", "λ/model", "class", "reqs", "strict", "sim", "TTFT p99",
                "max first-token wait", "within max wait", "sim within"):  # fmt: skip
        table.add_column(col, justify="right" if col not in ("policy", "class") else "left")
    for name, res in result["policies"].items():
        for p in res["points"]:
            simulated = p.get("sim", {}).get("by_class", {})
            for cls, c in p.get("by_class", {}).items():
                sim = simulated.get(cls, {})
                table.add_row(
                    name, f"{p['rate_per_model']:g}", cls, str(c["requests"]),
                    _pct(c["attainment"]), _pct(sim.get("attainment")), _fmt(c["ttft_s"]["p99"]),
                    _fmt(c["max_first_token_wait_s"]), _pct(c["within_max_wait"]),
                    _pct(sim.get("within_max_wait")),
                )  # fmt: skip
    console.print(table)


def cdf(values: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and their cumulative fractions."""
    xs = np.sort(np.asarray(values, dtype=float))
    return xs, np.arange(1, xs.size + 1) / max(1, xs.size)


def write_plot(result: dict, records: dict[str, list[RequestRecord]], path: Path) -> None:
    """Attainment vs rate (measured solid, simulated dashed) and TTFT / TBT CDFs at the highest
    rate, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (name, res) in enumerate(result["policies"].items()):
        color = f"C{i}"
        rates = [p["rate_per_model"] for p in res["points"]]
        axes[0].plot(rates, [p["attainment"] * 100 for p in res["points"]], "o-", color=color,
                     label=name)  # fmt: skip
        sims = [p["sim"]["attainment"] * 100 for p in res["points"] if "sim" in p]
        if len(sims) == len(rates):
            axes[0].plot(rates, sims, "x--", color=color, alpha=0.6, label=f"{name} (sim)")
        ttfts, tbts = [], []
        for record in records.get(name, []):
            ttft, _, _, gaps = latencies(record)
            if ttft is not None:
                ttfts.append(ttft)
            tbts.extend(gaps)
        for ax, values in ((axes[1], ttfts), (axes[2], tbts)):
            if values:
                ax.step(*cdf(values), where="post", color=color, label=name)
    slo = result["slo"]
    axes[0].axhline(90, color="grey", lw=0.8, ls=":")
    axes[0].set(xlabel="arrival rate per model (req/s)", ylabel="SLO attainment (%)",
                title="attainment vs rate", ylim=(-2, 102))  # fmt: skip
    axes[1].axvline(slo["ttft_s"], color="grey", lw=0.8, ls=":")
    axes[1].set(xlabel="TTFT (s)", ylabel="fraction", title="TTFT CDF (highest rate)")
    axes[2].axvline(slo["tbt_s"], color="grey", lw=0.8, ls=":")
    axes[2].set(xlabel="TBT (s)", ylabel="fraction", title="TBT CDF (highest rate)",
                xscale="log")  # fmt: skip
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
