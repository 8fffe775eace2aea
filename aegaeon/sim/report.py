"""Rich tables for ``aegaeon sim``'s results (printing only; the numbers are the JSON's)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _fmt(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def print_setting(out: dict) -> None:
    """One setting: a row per policy."""
    s = out["setting"]
    table = Table(
        title=f"{s['models']} models · λ={s['rate_per_model']}/s each · {s['cost_model']} · "
        f"SLO TTFT {s['slo']['ttft_s']}s TBT {s['slo']['tbt_s']}s · {s['requests']} requests"
    )
    for col in ("policy", "GPUs", "models/GPU", "attainment", "time-fraction", "TTFT p90 s",
                "TBT p99 s"):  # fmt: skip
        table.add_column(col)
    for policy, row in out["policies"].items():
        m = row.get("metrics", row)
        ttft = m.get("ttft_p90_s", m.get("ttft_s", {}).get("p90") if "ttft_s" in m else None)
        tbt = m.get("tbt_p99_s", m.get("tbt_s", {}).get("p99") if "tbt_s" in m else None)
        table.add_row(policy, _fmt(row["gpus"]), _fmt(row.get("models_per_gpu")),
                      _fmt(m["attainment"]), _fmt(m["time_fraction_attainment"]), _fmt(ttft),
                      _fmt(tbt))  # fmt: skip
    Console().print(table)


def print_paper(out: dict) -> None:
    """The paper grid: GPUs needed and models per GPU, a row per point."""
    table = Table(title=f"GPUs needed for ≥90% SLO attainment ({out['setting']['cost_model']})")
    policies = list(out["points"][0]["policies"])
    for col in ("SLO ×", "λ", "models", *policies, "aegaeon models/GPU"):
        table.add_column(col)
    for p in out["points"]:
        pol = p["policies"]
        table.add_row(_fmt(p["slo_scale"]), _fmt(p["rate_per_model"]), _fmt(p["models"]),
                      *(_fmt(pol[k]["gpus"]) for k in policies),
                      _fmt(pol.get("aegaeon", {}).get("models_per_gpu")))  # fmt: skip
    console = Console()
    console.print(table)
    head = out["headline"]
    console.print(
        f"80 models, λ=0.1, paper SLOs: aegaeon/dedicated GPUs = {_fmt(head['gpus_vs_dedicated'])}"
        f" (goal ≤ 0.18); models/GPU vs request-level = "
        f"{_fmt(head['models_per_gpu_vs_request_level'])} (goal ≥ 2)"
    )
    tf = out["headline_time_fraction_view"]
    console.print(
        f"time-fraction view: aegaeon/dedicated = {_fmt(tf['gpus_vs_dedicated'])}, "
        f"vs request-level = {_fmt(tf['models_per_gpu_vs_request_level'])}"
    )
