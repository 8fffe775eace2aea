"""Step and switch times a policy falls back on when its driver gives no estimator. Pure."""

from __future__ import annotations


class DefaultEstimator:
    """A 7B-on-H100-like guess, so that quotas and remaining times stay defined."""

    def prefill_time(self, model: str, prompt_lens: list[int]) -> float:
        return 0.01 + 2e-5 * sum(prompt_lens)

    def decode_time(self, model: str, context_lens: list[int]) -> float:
        return 0.01 + 1e-7 * sum(context_lens) + 1e-4 * len(context_lens)

    def switch_time(self, model: str) -> float:
        return 0.3
