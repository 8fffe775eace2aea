"""The ``sllm-plus`` baseline: ServerlessLLM+ of the Aegaeon paper, ServerlessLLM ordered
shortest-remaining-time-first (SRTF).

Routing is ``request-level``'s (warm instance that can take it, else scale-out onto an idle
instance, else queue). On each turn an instance runs the model of the request with the shortest
estimated remaining time on it (among the highest priority class waiting, see
:meth:`Policy.ranks`), and that model's requests shortest first, as many as fit. A
request's remaining time is what the policy can know, not the oracle output length the paper's
simulator used::

    remaining = (prefill time, if not prefilled yet) + (max_tokens − generated) × step time

with the step time the estimator's for a batch of that one request at its current context, and
a model not resident on the instance also pays its switch time (and, with a locality hint, the
time to bring its weights to the instance's node). ``max_tokens`` is an upper bound (a request
may stop earlier at an end-of-sequence token), so the order is by the longest each request may
still take.

SRTF is preemptive at turn boundaries: a shorter request of another model takes the instance at
the next turn, and the requests it displaces lose their KV with their model's instance (as in
the paper's simulator, where a swap evicts every request on the worker): they are recomputed
when they run again (ServerlessLLM has no KV swap, so none is asked for). Their remaining time
then counts that prefill again.
"""

from __future__ import annotations

from aegaeon.scheduler.policies.base import InstanceView, RequestView
from aegaeon.scheduler.policies.default_costs import DefaultEstimator
from aegaeon.scheduler.policies.request_level import RequestLevelPolicy


class SllmPlusPolicy(RequestLevelPolicy):
    """ServerlessLLM with shortest-remaining-time-first order (``--policy sllm-plus``)."""

    name = "sllm-plus"

    def remaining_time(self, request: RequestView) -> float:
        """Estimated time the request still needs on a device holding its model."""
        est = self.estimator or DefaultEstimator()
        left = max(0, request.max_tokens - request.generated)
        step = est.decode_time(request.model, [request.context_len])
        prefill = (
            0.0 if request.prefilled else est.prefill_time(request.model, [request.prompt_len])
        )
        return prefill + left * step

    def plan_batch(self, view: InstanceView, now: float) -> tuple[str, list[str]] | None:
        queue = self.queues[view.instance_id]
        if not queue:
            return None
        est = self.estimator or DefaultEstimator()
        remaining = {r: self.remaining_time(self.requests[r]) for r in queue}

        def cost(request_id: str) -> float:
            model = self.requests[request_id].model
            switch = 0.0 if model == view.resident_model else est.switch_time(model)
            if switch and self.locality is not None:
                switch += self.fetch_s(view.instance_id, model)
            return remaining[request_id] + switch

        ranks = self.ranks(queue, now)  # a higher class first; one class: SRTF alone
        model = self.requests[min(queue, key=lambda r: (ranks[r], cost(r)))].model
        self.period[view.instance_id] = (model, float("inf"))
        mine = sorted(
            (r for r in queue if self.requests[r].model == model), key=lambda r: remaining[r]
        )
        return model, self.fit(view, mine)
