"""model-store: the model registry, the shared-memory host weight cache, prefetch, demo models."""
