"""Keys are configured hashed and compared in constant time; errors have OpenAI's shape."""

from __future__ import annotations

import json

import pytest
from aegaeon.gateway.auth import ANONYMOUS, AuthError, KeyStore, hash_key
from aegaeon.gateway.errors import APIError, validation_error
from fastapi.exceptions import RequestValidationError


@pytest.fixture
def toml_keys(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(
        f'[[keys]]\nname = "a"\nsha256 = "{hash_key("sk-a")}"\nrpm = 5\nmodels = ["m1"]\n'
        f'[[keys]]\nname = "b"\nsha256 = "{hash_key("sk-b").upper()}"\n'
    )
    return path


def test_no_key_file_means_open_access():
    store = KeyStore.load(None)
    assert store.open_access
    assert store.authenticate(None) is ANONYMOUS


def test_keys_load_from_toml_with_limits_and_models(toml_keys):
    store = KeyStore.load(toml_keys)
    key = store.authenticate("Bearer sk-a")
    assert key.name == "a" and key.limit.rpm == 5
    assert key.allows("m1") and not key.allows("m2")
    assert store.authenticate("bearer sk-b").allows("anything")


def test_keys_load_from_json(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "j", "sha256": hash_key("k"), "tpm": 9}]}))
    assert KeyStore.load(path).authenticate("Bearer k").limit.tpm == 9


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic sk-a", "Bearer sk-x"])
def test_missing_or_wrong_keys_are_refused(toml_keys, header):
    with pytest.raises(AuthError):
        KeyStore.load(toml_keys).authenticate(header)


def test_a_key_file_with_a_plain_key_instead_of_a_hash_is_refused(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"keys": [{"name": "oops", "sha256": "sk-plain-key"}]}))
    with pytest.raises(ValueError, match="64 hex"):
        KeyStore.load(path)


def test_the_key_is_not_kept_in_the_store(toml_keys):
    store = KeyStore.load(toml_keys)
    assert "sk-a" not in repr(store.keys)


def test_error_body_has_openai_fields_and_retry_after_is_whole_seconds():
    error = APIError(429, "slow down", code="rate_limit_exceeded", retry_after=0.2)
    assert error.body() == {
        "error": {
            "message": "slow down",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert error.headers() == {"Retry-After": "1"}
    assert APIError(404, "x").type == "not_found_error"


def test_validation_errors_become_400_naming_the_field():
    exc = RequestValidationError(
        [{"type": "int_type", "loc": ("body", "max_tokens"), "msg": "Input should be an integer"}]
    )
    error = validation_error(exc)
    assert error.status == 400 and error.param == "max_tokens"
    invalid_json = RequestValidationError(
        [{"type": "json_invalid", "loc": ("body", 3), "msg": "x"}]
    )
    assert validation_error(invalid_json).code == "invalid_json"
    not_parsed = RequestValidationError([{"type": "dict_type", "loc": ("body",), "msg": "x"}])
    assert validation_error(not_parsed, "text/plain").code == "invalid_content_type"
    assert validation_error(not_parsed, "application/json").code == "invalid_value"
    assert (
        validation_error(not_parsed, "application/vnd.api+json; charset=utf-8").code
        == "invalid_value"
    )
