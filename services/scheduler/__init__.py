"""scheduler: per-model queues, instance state and the token-level policies.

- ``service``: the NATS + Redis shell (SchedulerService) that drives a policy with real workers.
- ``books``: what the shell tracks beside the policy (request holders, turns in flight).
- ``store``: the Redis side (persisted queue for restarts, request metadata, recovery tokens).
- ``policies``: the pure policies, by name (``make_policy``); ``estimators``: step-time models.
- ``main``: ``aegaeon serve scheduler``.
"""
