"""scheduler: per-model queues, instance state and the token-level policies."""
