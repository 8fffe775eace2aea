"""Keys-file semantics, read as an operator's mistakes would be: a configured file is enforced
(an empty one refuses everyone), a file that does not load stops the gateway at start with the
file named (before ``aegaeon up`` starts anything), and open access off loopback is refused
unless asked for by name."""

from __future__ import annotations

import argparse
import json
import time

import pytest
from aegaeon.gateway.auth import AuthError, KeysFileError, KeyStore, exposure_refusal, hash_key
from aegaeon.gateway.main import main as gateway_main
from aegaeon.gateway.main import startup_refusal
from aegaeon.gateway.settings import GatewaySettings

from aegaeon import launcher
from aegaeon.config import BusConfig


def write(tmp_path, body: str, name: str = "keys.json"):
    path = tmp_path / name
    path.write_text(body)
    return path


@pytest.mark.parametrize("body", ['{"keys": []}', "[]"])
def test_a_keys_file_that_lists_no_keys_refuses_every_request(tmp_path, body):
    store = KeyStore.load(write(tmp_path, body))
    assert not store.open_access
    for header in (None, "Bearer anything"):
        with pytest.raises(AuthError):
            store.authenticate(header)


GOOD = hash_key("k")


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ("", "keys.json"),
        ("{not json", "keys.json"),
        ('{"keys": {"sha256": "x"}}', "must be a list"),
        ('{"keys": ["just a string"]}', "#1"),
        ('{"keys": [{"name": "a"}]}', "sha256"),
        (json.dumps({"keys": [{"sha256": 5}]}), "64 hex"),
        (json.dumps({"keys": [{"sha256": GOOD, "rpm": 0}]}), "rpm must be a positive"),
        (json.dumps({"keys": [{"sha256": GOOD, "tpm": -3}]}), "tpm must be a positive"),
        (json.dumps({"keys": [{"sha256": GOOD, "rpm": "60"}]}), "rpm must be a positive"),
        (json.dumps({"keys": [{"sha256": GOOD, "rpm": True}]}), "rpm must be a positive"),
        (json.dumps({"keys": [{"sha256": GOOD, "models": "m1"}]}), "models must be a list"),
        (json.dumps({"keys": [{"sha256": GOOD, "name": 7}]}), "name must be"),
    ],
)
def test_a_keys_file_that_does_not_load_names_the_file_and_the_entry(tmp_path, body, named):
    path = write(tmp_path, body)
    with pytest.raises(KeysFileError, match=named) as caught:
        KeyStore.load(path)
    assert str(path) in str(caught.value)


def test_a_missing_keys_file_is_an_error_not_open_access(tmp_path):
    with pytest.raises(KeysFileError, match=r"keys\.json"):
        KeyStore.load(tmp_path / "keys.json")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "example.org"])
def test_open_access_off_loopback_is_refused_unless_asked_for(host):
    open_store = KeyStore.load(None)
    assert "--insecure-open" in (exposure_refusal(host, open_store, insecure_open=False) or "")
    assert exposure_refusal(host, open_store, insecure_open=True) is None
    assert exposure_refusal(host, KeyStore([], enforced=True), insecure_open=False) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_open_access_on_loopback_is_the_development_default(host):
    assert exposure_refusal(host, KeyStore.load(None), insecure_open=False) is None


def test_the_gateway_exits_at_start_on_an_empty_keys_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AEGAEON_API_KEYS_FILE", str(write(tmp_path, "")))
    args = argparse.Namespace(host="127.0.0.1", port=1, gateway_id="g", insecure_open=False)
    assert gateway_main(args) == 2
    assert "keys.json" in capsys.readouterr().err
    settings = GatewaySettings(bus=BusConfig())
    assert "keys.json" in (startup_refusal(settings, "127.0.0.1", False) or "")


def test_aegaeon_up_stops_at_once_on_a_bad_keys_file_and_on_open_access_off_loopback(
    tmp_path, monkeypatch, capsys
):
    parser = argparse.ArgumentParser()
    launcher.add_arguments(parser)
    monkeypatch.setenv("AEGAEON_API_KEYS_FILE", str(write(tmp_path, "{")))
    started = time.monotonic()
    assert launcher.main(parser.parse_args(["--home", str(tmp_path / "home")])) == 2
    assert "keys.json" in capsys.readouterr().err
    monkeypatch.delenv("AEGAEON_API_KEYS_FILE")
    assert launcher.main(parser.parse_args(["--host", "0.0.0.0", "--home", str(tmp_path)])) == 2
    assert "--insecure-open" in capsys.readouterr().err
    assert time.monotonic() - started < 5  # no server was started, no ready timeout waited out
