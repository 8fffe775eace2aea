"""gateway: the OpenAI-compatible HTTP API, SSE streams, tokenization, keys and limits."""
