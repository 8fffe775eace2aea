"""The idle clock behind keep-alive (services/scheduler/keep_alive.py): a model idle past its
keep-alive is due once per idle spell; work starts a new spell; a model without a keep-alive is
never due and not remembered."""

from __future__ import annotations

from aegaeon.scheduler.keep_alive import IdleClock


def test_a_model_is_due_once_its_idle_spell_passes_its_keep_alive_and_once_only() -> None:
    clock = IdleClock()
    keep = {"a": 10.0, "b": 0.0}
    assert clock.due(0.0, {"a", "b"}, keep) == []
    assert clock.due(9.9, set(), keep) == []  # idle since 0.0: not yet
    assert clock.due(10.0, set(), keep) == ["a"]
    assert clock.due(50.0, set(), keep) == []  # that spell was acted on
    assert clock.due(51.0, {"a"}, keep) == []  # work: a new spell starts at its end
    assert clock.due(60.0, set(), keep) == []
    assert clock.due(61.0, set(), keep) == ["a"]
    assert "b" not in clock.last_busy  # no keep-alive: never due, never remembered


def test_a_model_first_seen_idle_starts_its_spell_then_and_a_dropped_keep_alive_is_forgotten() -> None:  # fmt: skip
    clock = IdleClock()
    assert clock.due(100.0, set(), {"a": 5.0}) == []  # a restarted scheduler: idle from now
    assert clock.due(104.0, set(), {"a": 5.0}) == []
    assert clock.due(105.0, set(), {"a": 5.0}) == ["a"]
    assert clock.due(106.0, set(), {"a": 0.0}) == []
    assert clock.last_busy == {} and clock.evicted == set()
    assert clock.due(107.0, set(), {"a": 5.0}) == []  # set again: a fresh spell
    assert clock.due(112.0, set(), {"a": 5.0}) == ["a"]
