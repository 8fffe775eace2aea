"""gpu-worker: the engine (arena, paged KV, runners, sampler, swap) behind a NATS shell."""
