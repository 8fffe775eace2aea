"""The pure parts of the model lifecycle: the moves between states and what each refusal says
(``aegaeon/lifecycle.py``), the model-store's book of states and serving settings (priority
class, pin) and the removal of a folder (``model_store/lifecycle.py``), and what ``aegaeon models
deploy|drain|remove|priority|pin`` sends and prints."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
from aegaeon.model_store.lifecycle import MARKS_FILE, LifecycleBook, record_serving, remove_entry

from aegaeon.cli import COMMANDS
from aegaeon.lifecycle import MOVES, LifecycleError, client_reason, next_state, serving_refusal
from aegaeon.model_admin import error_text, load_outcome, request_of, result_text
from aegaeon.serving import (
    MAX_KEEP_ALIVE_S,
    MAX_PIN,
    check_keep_alive,
    check_pin,
    keep_alive_argument,
    pin_argument,
)

STATES = (None, "loading", "ready", "draining", "failed")

ALLOWED = {
    ("deploy", None): "loading",
    ("cached", "loading"): "ready",
    ("fail", "loading"): "failed",
    ("drain", "ready"): "draining",
    ("drain", "draining"): "draining",
    ("remove", "draining"): None,
    ("remove", "failed"): None,
}
"""Every move the lifecycle allows, written out: anything else is refused."""


# ---------------------------------------------------------------- moves


@pytest.mark.parametrize("action", sorted(MOVES))
@pytest.mark.parametrize("state", STATES)
def test_exactly_the_documented_moves_are_allowed(action, state) -> None:
    if (action, state) in ALLOWED:
        assert next_state("m", state, action) == ALLOWED[(action, state)]
        return
    with pytest.raises(LifecycleError) as refused:
        next_state("m", state, action)
    assert refused.value.status == (404 if state is None else 409)
    assert "'m'" in refused.value.message


def test_refusals_say_what_to_do_instead() -> None:
    def why(state, action) -> str:
        with pytest.raises(LifecycleError) as refused:
            next_state("m", state, action)
        return refused.value.message

    assert "drain it first" in why("ready", "remove") and "aegaeon models drain m" in why("ready", "remove")  # fmt: skip
    assert "pick another name" in why("ready", "deploy")
    assert "remove it instead" in why("failed", "drain")
    assert "still loading" in why("loading", "remove")
    assert "not registered" in why(None, "drain")


def test_only_a_ready_model_takes_requests_and_the_others_say_how_to_refuse() -> None:
    assert serving_refusal("m", "ready") is None
    loading = serving_refusal("m", "loading")
    assert loading and loading.status == 503 and loading.retry_after and loading.code == "model_loading"  # fmt: skip
    draining = serving_refusal("m", "draining")
    assert draining and draining.status == 409 and draining.retry_after is None
    assert "'m' is draining" in draining.message
    failed = serving_refusal("m", "failed", "disk full")
    assert failed and failed.status == 409 and "failed to load: disk full" in failed.message


def test_a_failure_reason_reaches_clients_without_the_nodes_paths() -> None:
    reason = ("/dev/shm/aegaeon-up-3/m.safetensors: 538060032 bytes of weights do not fit; "
              "cannot cache m: [Errno 28] No space left on device: '/models/.m.tmp'")  # fmt: skip
    assert client_reason(reason) == (
        "m.safetensors: 538060032 bytes of weights do not fit; "
        "cannot cache m: [Errno 28] No space left on device: '.m.tmp'"
    )
    kept = "see http://host/a/b, ./relative/x, ~/home/y (size /dev/shm, e.g. shm_size)"
    assert client_reason(kept) == kept  # URLs, relative paths and the advice stay
    failed = serving_refusal("m", "failed", reason)
    assert failed and "/dev/shm/aegaeon" not in failed.message and "/models" not in failed.message


# ---------------------------------------------------------------- the book


def test_the_book_records_moves_where_another_book_reads_them(tmp_path: Path) -> None:
    book = LifecycleBook(tmp_path)
    assert book.state("m", registered=True) == "ready"  # unmarked: as found in the directory
    assert book.state("m", registered=False) is None
    book.move("m", False, "deploy", origin="import")
    assert LifecycleBook(tmp_path).state("m", registered=False) == "loading"  # even unlinked yet
    book.move("m", True, "fail", "no room")
    other = LifecycleBook(tmp_path)
    assert (other.state("m", True), other.reason("m"), other.origin("m")) == ("failed", "no room", "import")  # fmt: skip
    book.move("m", True, "remove")
    assert json.loads((tmp_path / MARKS_FILE).read_text()) == {}  # a removed model leaves nothing


def test_a_change_made_from_a_stale_copy_keeps_what_other_writers_wrote(tmp_path: Path) -> None:
    for name in ("y", "z"):
        (tmp_path / name).mkdir()
    store = LifecycleBook(tmp_path)  # a store's copy, read once
    record_serving(tmp_path, "y", priority="high", pin=3)  # `models add --priority --pin`
    LifecycleBook(tmp_path).move("z", True, "drain")  # another store sharing the directory
    store.move("y", True, "drain")  # from the copy read before both
    store.discard("nothing")
    marks = json.loads((tmp_path / MARKS_FILE).read_text())
    assert (marks["y"]["state"], marks["y"]["priority"], marks["y"]["pin"]) == ("draining", "high", 3)  # fmt: skip
    assert marks["z"]["state"] == "draining"  # not undone by the stale copy


def test_a_book_sees_what_another_store_wrote_and_ignores_stale_marks(tmp_path: Path) -> None:
    mine, theirs = LifecycleBook(tmp_path), LifecycleBook(tmp_path)
    theirs.move("m", True, "drain")
    mine.reload_if_changed()
    assert mine.state("m", registered=True) == "draining"
    # Its folder deleted by hand: the mark is stale, the model absent, the name free again.
    assert mine.state("m", registered=False) is None
    assert mine.move("m", False, "deploy") == "loading"


def test_a_refused_move_changes_nothing_and_an_unreadable_file_reads_as_all_ready(tmp_path: Path) -> None:  # fmt: skip
    book = LifecycleBook(tmp_path)
    with pytest.raises(LifecycleError):
        book.move("m", True, "remove")
    assert not (tmp_path / MARKS_FILE).exists()
    (tmp_path / MARKS_FILE).write_text("{not json")
    assert LifecycleBook(tmp_path).state("m", registered=True) == "ready"


def test_the_book_keeps_the_settings_through_moves_and_drops_them_with_the_model(tmp_path: Path) -> None:  # fmt: skip
    book = LifecycleBook(tmp_path)
    assert (book.priority("found"), book.pin("found")) == ("normal", 0)  # unmarked: the defaults
    book.set_serving("found", True, priority="high")
    book.set_serving("found", True, pin=2)  # one setting given: the other stays
    other = LifecycleBook(tmp_path)  # a restarted store, or another sharing the directory
    assert (other.priority("found"), other.pin("found"), other.state("found", True), other.loading()) == ("high", 2, "ready", [])  # fmt: skip
    book.move("found", True, "drain")
    moved = LifecycleBook(tmp_path)  # a move keeps the settings
    assert (moved.priority("found"), moved.pin("found"), moved.state("found", True)) == ("high", 2, "draining")  # fmt: skip
    book.set_serving("found", True, pin=0)  # unpinned, in any state
    assert (LifecycleBook(tmp_path).pin("found"), book.priority("found")) == (0, "high")
    book.move("found", True, "remove")
    assert "found" not in json.loads((tmp_path / MARKS_FILE).read_text())
    assert (book.priority("found"), book.pin("found")) == ("normal", 0)

    book.move("deployed", False, "deploy", priority="low", pin=3)
    book.move("deployed", True, "cached")
    assert (LifecycleBook(tmp_path).priority("deployed"), LifecycleBook(tmp_path).pin("deployed")) == ("low", 3)  # fmt: skip
    entry = json.loads((tmp_path / MARKS_FILE).read_text())["deployed"]
    assert (entry["state"], entry["priority"], entry["pin"]) == ("ready", "low", 3)


def test_a_setting_is_refused_for_an_absent_model_or_out_of_range_and_a_stale_one_is_dropped(
    tmp_path: Path,
) -> None:
    book = LifecycleBook(tmp_path)
    with pytest.raises(LifecycleError) as absent:
        book.set_serving("gone", False, priority="high")
    assert absent.value.status == 404 and "'gone' is not registered" in absent.value.message
    with pytest.raises(LifecycleError) as unknown:
        book.set_serving("m", True, priority="urgent")
    assert unknown.value.status == 400 and "low, normal, high" in unknown.value.message
    for pin in (-1, MAX_PIN + 1, True, 1.5, "2"):
        with pytest.raises(LifecycleError) as bad_pin:
            book.set_serving("m", True, pin=pin)  # type: ignore[arg-type]
        assert bad_pin.value.status == 400, pin
        assert f"pin must be a whole number of instances from 0 (not pinned) to {MAX_PIN}; got {pin!r}" in bad_pin.value.message  # fmt: skip
    with pytest.raises(LifecycleError) as half_bad:  # one bad setting: neither is recorded
        book.set_serving("m", True, priority="high", pin=-1)
    assert half_bad.value.status == 400
    with pytest.raises(LifecycleError) as nothing:
        book.set_serving("m", True)
    assert nothing.value.status == 400 and "Nothing to set for 'm'" in nothing.value.message
    with pytest.raises(LifecycleError) as bad_deploy:
        book.move("new", False, "deploy", pin=-1)
    assert bad_deploy.value.status == 400
    assert not (tmp_path / MARKS_FILE).exists()  # none wrote anything
    book.set_serving("m", True, priority="high", pin=MAX_PIN)
    assert (book.priority("m"), book.pin("m")) == ("high", MAX_PIN)
    # Its folder deleted by hand, then a model deployed under its name: a new model's settings.
    book.move("m", False, "deploy")
    assert (book.priority("m"), book.pin("m")) == ("normal", 0)


def test_a_bad_setting_in_the_file_reads_as_its_default_is_logged_and_keeps_the_rest(
    tmp_path: Path, caplog
) -> None:
    marks = {"m": {"state": "draining", "priority": "urgent", "pin": 2},
             "n": {"state": "ready", "priority": "low", "pin": -3},
             "o": {"state": "ready", "priority": "high", "pin": "2"},
             "p": {"state": "ready", "pin": 1}}  # fmt: skip
    (tmp_path / MARKS_FILE).write_text(json.dumps(marks))
    with caplog.at_level(logging.ERROR, logger="aegaeon.model_store.lifecycle"):
        book = LifecycleBook(tmp_path)
    assert (book.state("m", True), book.priority("m"), book.pin("m")) == ("draining", "normal", 2)
    assert (book.priority("n"), book.pin("n")) == ("low", 0)
    assert (book.priority("o"), book.pin("o")) == ("high", 0)
    assert (book.priority("p"), book.pin("p")) == ("normal", 1)
    logged = caplog.text
    assert "m has priority 'urgent'" in logged and "reads as normal" in logged
    assert "n: pin must be a whole number" in logged and "got -3: reads as 0" in logged
    assert "o: pin must be a whole number" in logged and "got '2': reads as 0" in logged
    # An entry written before the settings existed reads as normal and unpinned.
    (tmp_path / MARKS_FILE).write_text(json.dumps({"m": {"state": "draining", "origin": "link"}}))
    old = LifecycleBook(tmp_path)
    assert (old.priority("m"), old.pin("m"), old.state("m", True)) == ("normal", 0, "draining")


def test_the_settings_are_recorded_offline_only_for_a_model_folder_of_the_directory(tmp_path: Path) -> None:  # fmt: skip
    (tmp_path / "m").mkdir()
    record_serving(tmp_path, "m", "high")
    record_serving(tmp_path, "m", pin=4)
    assert (LifecycleBook(tmp_path).priority("m"), LifecycleBook(tmp_path).pin("m")) == ("high", 4)  # fmt: skip
    for name in ("nope", "../m", ".hidden"):
        with pytest.raises(LifecycleError) as refused:
            record_serving(tmp_path, name, "low", 1)
        assert refused.value.status == 404
    with pytest.raises(LifecycleError, match="priority must be one of"):
        record_serving(tmp_path, "m", "urgent")
    with pytest.raises(LifecycleError, match="pin must be a whole number"):
        record_serving(tmp_path, "m", pin=MAX_PIN + 1)
    assert LifecycleBook(tmp_path).pin("m") == 4


def test_a_pin_count_is_a_whole_number_from_0_to_the_bound_on_the_command_line_too() -> None:
    assert [check_pin(n) for n in (0, 1, MAX_PIN)] == [0, 1, MAX_PIN]
    assert pin_argument("3") == 3
    for word in ("-1", str(MAX_PIN + 1), "two", "1.5", ""):
        with pytest.raises(
            argparse.ArgumentTypeError, match=f"from 0 \\(not pinned\\) to {MAX_PIN}"
        ):
            pin_argument(word)


def test_a_keep_alive_is_seconds_from_0_to_the_bound_with_units_on_the_command_line() -> None:
    assert [check_keep_alive(v) for v in (0, 1, 2.5, MAX_KEEP_ALIVE_S)] == [0.0, 1.0, 2.5, MAX_KEEP_ALIVE_S]  # fmt: skip
    for bad in (-1, MAX_KEEP_ALIVE_S + 1, True, "5", float("nan"), float("inf"), None):
        with pytest.raises(ValueError, match="keep-alive must be a number of seconds from 0"):
            check_keep_alive(bad)
    words = {"90": 90.0, "90s": 90.0, "5m": 300.0, "2h": 7200.0, "1d": 86400.0, "0": 0.0}
    assert {w: keep_alive_argument(w) for w in words} == words
    for word in ("-1", "31d", "soon", "", "m"):
        with pytest.raises(argparse.ArgumentTypeError, match="keep-alive must be"):
            keep_alive_argument(word)


def test_the_book_keeps_a_keep_alive_beside_the_other_settings_and_reads_a_bad_one_as_0(
    tmp_path: Path, caplog
) -> None:
    book = LifecycleBook(tmp_path)
    assert book.keep_alive_s("m") == 0.0  # unmarked: never evicted for idling
    book.set_serving("m", True, pin=1)
    book.set_serving("m", True, keep_alive_s=300)  # the pin stays
    assert (LifecycleBook(tmp_path).keep_alive_s("m"), LifecycleBook(tmp_path).pin("m")) == (300.0, 1)  # fmt: skip
    with pytest.raises(LifecycleError) as bad:
        book.set_serving("m", True, keep_alive_s=-5)
    assert bad.value.status == 400 and "keep-alive must be" in bad.value.message
    assert LifecycleBook(tmp_path).keep_alive_s("m") == 300.0  # nothing changed
    (tmp_path / "n").mkdir()
    record_serving(tmp_path, "n", keep_alive_s=60)
    assert LifecycleBook(tmp_path).keep_alive_s("n") == 60.0
    (tmp_path / MARKS_FILE).write_text(json.dumps({"m": {"state": "ready", "keep_alive_s": "1h"}}))
    with caplog.at_level(logging.ERROR, logger="aegaeon.model_store.lifecycle"):
        assert LifecycleBook(tmp_path).keep_alive_s("m") == 0.0
    assert "m: keep-alive must be" in caplog.text and "reads as 0" in caplog.text


def test_removing_an_entry_unlinks_a_link_deletes_an_import_and_hides_any_other_folder(tmp_path: Path) -> None:  # fmt: skip
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "linked").symlink_to(target)
    (tmp_path / "converted").mkdir()
    (tmp_path / "by-hand").mkdir()
    (tmp_path / "by-hand" / "config.json").write_text("{}")
    assert "removed the link" in remove_entry(tmp_path, "linked", "link")
    assert not (tmp_path / "linked").is_symlink() and target.is_dir()
    assert "converted from GGUF" in remove_entry(tmp_path, "converted", "import")
    assert not (tmp_path / "converted").exists()
    note = remove_entry(tmp_path, "by-hand", None)
    hidden = [p for p in tmp_path.iterdir() if p.name.startswith(".removed-by-hand-")]
    assert len(hidden) == 1 and (hidden[0] / "config.json").exists() and str(hidden[0]) in note
    assert "already gone" in remove_entry(tmp_path, "never", None)


# ---------------------------------------------------------------- the CLI


def args(*words: str, **options) -> argparse.Namespace:
    return argparse.Namespace(command=("models", *words), **options)


def test_the_model_words_are_registered_beside_add_and_list() -> None:
    for verb in ("deploy", "drain", "remove", "priority", "pin", "keep-alive"):
        assert COMMANDS[("models", verb)][0] == "aegaeon.model_admin"
    assert ("models", "add") in COMMANDS and ("models", "list") in COMMANDS


def test_each_command_calls_its_admin_route(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    method, path, body = request_of(args("deploy", path=Path("m"), name="n", priority=None, pin=None))  # fmt: skip
    assert (method, path, body) == ("POST", "/v1/aegaeon/models", {"path": str(tmp_path / "m"), "name": "n"})  # fmt: skip
    body = request_of(args("deploy", path=Path("m"), name=None, priority="high", pin=None))[2]
    assert body == {"path": str(tmp_path / "m"), "priority": "high"}
    body = request_of(args("deploy", path=Path("m"), name=None, priority=None, pin=0))[2]
    assert body == {"path": str(tmp_path / "m"), "pin": 0}  # given, even 0: sent
    assert request_of(args("drain", name="n"))[:2] == ("POST", "/v1/aegaeon/models/n/drain")
    assert request_of(args("priority", name="n", priority="low")) == ("POST", "/v1/aegaeon/models/n/priority", {"priority": "low"})  # fmt: skip
    assert request_of(args("pin", name="n", instances=2)) == ("POST", "/v1/aegaeon/models/n/pin", {"instances": 2})  # fmt: skip
    assert request_of(args("keep-alive", name="n", seconds=300.0)) == ("POST", "/v1/aegaeon/models/n/keep_alive", {"seconds": 300.0})  # fmt: skip
    assert request_of(args("remove", name="n"))[:2] == ("DELETE", "/v1/aegaeon/models/n")


def test_the_cli_prints_what_happened_and_the_gateways_reason() -> None:
    card = {"id": "n", "state": "loading", "state_reason": None, "queued": 1, "running": 2,
            "priority": "normal", "pin": 0}  # fmt: skip
    assert result_text("deploy", card).startswith(
        "deployed n: loading, normal priority (its weights"
    )
    assert result_text("deploy", {**card, "pin": 2}).startswith("deployed n: loading, normal priority, pinned on 2 instances (")  # fmt: skip
    assert result_text("priority", {**card, "priority": "high"}) == "n is now high priority (loading)"  # fmt: skip
    assert result_text("pin", {**card, "pin": 1}) == "n is now pinned on 1 instance (loading)"
    assert result_text("pin", card) == "n is now unpinned (loading)"
    assert result_text("keep-alive", {**card, "keep_alive_s": 300.0}) == "n is now evicted after 300 s idle (loading)"  # fmt: skip
    assert result_text("keep-alive", {**card, "keep_alive_s": 0.0}) == "n is now kept until the room is needed (loading)"  # fmt: skip
    assert "aegaeon models remove n" in result_text("drain", {**card, "state": "draining"})
    assert result_text("remove", {"id": "n", "note": "removed the link"}) == "removed n: removed the link"  # fmt: skip
    assert load_outcome(card) is None
    assert load_outcome({**card, "state": "failed", "state_reason": "full"}) == "n failed to load: full"  # fmt: skip
    assert load_outcome({**card, "state": "ready"}) == "n is ready"
    error = {"error": {"message": "The model 'n' is ready: drain it first"}}
    assert error_text(409, error) == "HTTP 409: The model 'n' is ready: drain it first"
    assert error_text(502, "bad gateway") == "HTTP 502: bad gateway"
