"""A model as ``/v1/models`` shows it: OpenAI's model object with what Aegaeon knows of it (its
lifecycle state and serving settings from the model-store, where it is cached and resident, its
queues)."""

from __future__ import annotations

import time
from typing import Any

from aegaeon.lifecycle import client_reason
from aegaeon.protocol import ModelInfo

from .cluster import ClusterView


def model_card(info: ModelInfo, cluster: ClusterView) -> dict[str, Any]:
    """The card of one model (``openai_types.ModelCard`` describes it)."""
    workers = cluster.residency().get(info.name, [])
    queued, running = cluster.queues()
    return {
        "id": info.name,
        "object": "model",
        "created": info.created or int(time.time()),
        "owned_by": "aegaeon",
        "state": info.state,
        "state_reason": client_reason(info.state_reason) or None,
        "residency": "resident" if workers else "cold",
        "resident_on": workers,
        "cached": info.cached,
        "cached_on": [info.cache_store] if info.cached and info.cache_store else [],
        "context_length": info.context_length,
        "dtype": info.dtype,
        "queued": queued.get(info.name, 0),
        "running": running.get(info.name, 0),
        "priority": info.priority,
        "pin": info.pin,
        "keep_alive_s": info.keep_alive_s,
    }
