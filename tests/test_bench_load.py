"""``aegaeon bench load --greedy-unread``: one API key holding never-read streams gets only its
share of the gateway's slots; the other key's clients are still served, and nothing is lost."""

from __future__ import annotations

import argparse
import json

import pytest

from aegaeon.bench import load

pytestmark = pytest.mark.slow


def test_a_greedy_key_holding_unread_streams_gets_its_share_and_the_clients_are_served(
    demo_models_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("AEGAEON_MAX_IN_FLIGHT_PER_KEY", "8")
    parser = argparse.ArgumentParser()
    load.add_arguments(parser)
    out = tmp_path / "load.json"
    args = parser.parse_args([
        "--models-dir", str(demo_models_dir), "--clients", "12", "--duration", "6",
        "--greedy-unread", "20", "--greedy-max-tokens", "900", "--json", str(out),
    ])  # fmt: skip
    assert load.main(args) == 0
    result = json.loads(out.read_text())
    assert result["greedy_opened"] <= 8 and result["greedy_refused"] >= 12
    assert result["greedy_opened"] + result["greedy_refused"] == 20
    assert result["finished"] > 0 and result["lost"] == 0
