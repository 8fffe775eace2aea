"""Aegaeon: serve many LLMs on a few shared GPUs with token-level model switching."""

__version__ = "0.1.0"
