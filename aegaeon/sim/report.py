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
    """One setting: a row per policy, with the layout behind it."""
    s = out["setting"]
    table = Table(
        title=f"{s['models']} models · λ={s['rate_per_model']}/s each · {s['cost_model']} · "
        f"SLO TTFT {s['slo']['ttft_s']}s TBT {s['slo']['tbt_s']}s · {s['requests']} requests"
    )
    for col in ("policy", "GPUs", "layout", "models/GPU", "strict", "time-fraction",
                "artifact QoS", "TTFT p90 s", "TBT p99 s"):  # fmt: skip
        table.add_column(col)
    for policy, row in out["policies"].items():
        m = row.get("metrics", row)
        ttft = m.get("ttft_p90_s", m.get("ttft_s", {}).get("p90") if "ttft_s" in m else None)
        tbt = m.get("tbt_p99_s", m.get("tbt_s", {}).get("p99") if "tbt_s" in m else None)
        table.add_row(policy, _fmt(row["gpus"]), row["layout"]["name"],
                      _fmt(row.get("models_per_gpu")), _fmt(m["attainment"]),
                      _fmt(m["time_fraction_attainment"]), _fmt(m["artifact_qos"]), _fmt(ttft),
                      _fmt(tbt))  # fmt: skip
    Console().print(table)


def print_fleet(out: dict) -> None:
    """A fleet of nodes: a row per policy and locality mode, with what was fetched."""
    s, n = out["setting"], out["setting"]["nodes"]
    table = Table(
        caption="GPUs: fewest reaching the target on the fleet (— : none); * the run stopped "
        "once the target was out of reach (attainment so far)",
        title=f"{s['models']} models · λ={s['rate_per_model']}/s each · {s['requests']} requests "
        f"· {n['count'] or '—'} nodes × {n['gpus_per_node']} {s['device']} · host cache "
        f"{n['host_cache_gb']:.0f} GB/node · fetch {n['fetch_gb_per_s']:.3g} GB/s · SLO TTFT "
        f"{s['slo']['ttft_s']}s TBT {s['slo']['tbt_s']}s",
    )
    for col in ("policy", "locality", "GPUs", "layout", "strict", "fetches", "fetched TB",
                "fetch wait s", "runs", "wall s"):  # fmt: skip
        table.add_column(col)
    for policy, modes in out["policies"].items():
        for mode, row in modes.items():
            m = row.get("metrics", row)
            fetched = row.get("fetches") or {}
            tb = fetched.get("fetched_gb")
            strict = _fmt(m["attainment"]) + ("*" if row.get("stopped_early") else "")
            table.add_row(policy, "on" if mode == "locality" else "off", _fmt(row["gpus"]),
                          row["layout"]["name"], strict,
                          _fmt(fetched.get("fetches")), _fmt(tb / 1000 if tb is not None else None),
                          _fmt(row.get("fetch_wait_s")), _fmt(row.get("runs", 1)),
                          _fmt(row.get("wall_s")))  # fmt: skip
    Console().print(table)


def print_paper(out: dict) -> None:
    """The paper study: attainment on 16 GPUs per point (artifact QoS / strict, and the layout
    that gave the artifact QoS), then the figures."""
    s = out["setting"]
    table = Table(title=f"SLO attainment on {s['gpus']} GPUs ({s['cost_model']}): "
                  "artifact QoS / strict [layout]")  # fmt: skip
    policies = s["policies"]
    for col in ("SLO ×", "λ", "models", *policies):
        table.add_column(col)
    for p in out["points"]:
        cells = []
        for policy in policies:
            row = p["policies"][policy]
            qos, strict = row["artifact_qos"], row["attainment"]
            cells.append(f"{qos['value']:.2f} / {strict['value']:.2f} [{qos['layout']}]")
        table.add_row(_fmt(p["slo_scale"]), _fmt(p["rate_per_model"]), _fmt(p["models"]), *cells)
    console = Console()
    console.print(table)
    at90 = out["models_at_90"]
    console.print("models served at ≥90% on 16 GPUs, λ 0.1, SLO ×1 (artifact QoS / strict): "
                  + ", ".join(f"{p} {v['artifact_qos']} / {v['attainment']}"
                              for p, v in at90.items()))  # fmt: skip
    for key in ("sllm_plus", "static_mux", "request_level"):
        console.print(f"models_at_90_vs_{key} = {_fmt(out[f'models_at_90_vs_{key}'])} "
                      f"(strict {_fmt(out[f'models_at_90_vs_{key}_strict'])})")  # fmt: skip
    head = out["gpus_needed_at_80"]["policies"]
    console.print("GPUs needed at 80 models (strict): " + ", ".join(
        f"{p} {_fmt(v['gpus'])} [{v['layout']['name']}]" for p, v in head.items()))  # fmt: skip
    console.print(f"gpus_vs_dedicated = {_fmt(out['gpus_vs_dedicated'])} (goal ≤ 0.18)")
