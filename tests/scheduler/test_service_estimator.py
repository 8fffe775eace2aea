"""The scheduler service feeds the policy's estimator the switch time workers measured (what
prefetching left exposed), with the fake workers of ``test_service``."""

from __future__ import annotations

from typing import Any

from scheduler_harness import harness, wait_for

__all__ = ["harness"]  # the fixture, shared with test_service


class RecordingEstimator:
    """Answers like a constant estimator; records what ``observe_switch`` is told."""

    def __init__(self) -> None:
        self.switches: list[tuple[str, dict[str, Any]]] = []

    def prefill_time(self, model: str, prompt_lens: list[int]) -> float:
        return 0.01

    def decode_time(self, model: str, context_lens: list[int]) -> float:
        return 0.01

    def switch_time(self, model: str) -> float:
        return 0.01

    def observe_switch(self, model: str, **measured: Any) -> None:
        self.switches.append((model, measured))


async def test_turns_that_switched_feed_the_estimator_the_exposed_switch_time(harness):
    estimator = RecordingEstimator()
    worker = await harness.worker("w")
    worker.turn_done_extras = {"switch_s": 0.02, "switch_bytes": 300, "prefetched_bytes": 700}
    await harness.scheduler(estimator_factory=lambda models: estimator)
    await harness.submit("r1", max_tokens=2)
    await wait_for(lambda: harness.finished("r1"))
    await wait_for(lambda: estimator.switches, what="a switch to be observed")
    model, measured = estimator.switches[0]
    assert model == "a"
    assert measured == {"exposed_s": 0.02, "copied_bytes": 300, "prefetched_bytes": 700}


async def test_turns_without_a_switch_tell_the_estimator_nothing(harness):
    estimator = RecordingEstimator()
    await harness.worker("w")
    await harness.scheduler(estimator_factory=lambda models: estimator)
    await harness.submit("r1", max_tokens=2)
    await wait_for(lambda: harness.finished("r1"))
    assert estimator.switches == []
