"""An estimator with round numbers for policy tests: decode 10 ms/step, prefill 100 ms,
switch 1 s."""

from __future__ import annotations


class FixedCosts:
    def prefill_time(self, model: str, prompt_lens: list[int]) -> float:
        return 0.1

    def decode_time(self, model: str, context_lens: list[int]) -> float:
        return 0.01

    def switch_time(self, model: str) -> float:
        return 1.0
