"""Tokenizers per model, loaded once from the model's folder, and chat templates.

A model's folder is read in place when this gateway can see it (same node as the model-store);
otherwise its small files are fetched over NATS (``models.file``) into a local cache directory.
Loading runs in a thread: it is file I/O and Python-heavy, and the event loop serves streams.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from aegaeon.bus import Bus
from aegaeon.protocol import ModelInfo

from .token_bytes import TokenSpelling, token_label

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
"""Files a tokenizer may need; a model has a subset of them."""

CONTENT_MARK = "\u2063\u2063aegaeon-content\u2063"
"""Stands for a message's content while its template is rendered (invisible separators: no one
types them, and no template transforms them)."""

MARKED = re.compile(f"{re.escape(CONTENT_MARK)}(\\d+){re.escape(CONTENT_MARK)}")

FALLBACK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
"""For a model whose tokenizer has no chat template: plain ``role: content`` lines."""


class TemplateRefusal(ValueError):
    """The model's chat template refused the conversation (its ``raise_exception``: Gemma's
    refuses a system message, Mistral's roles that do not alternate): the client's to change."""


@dataclass
class ModelTokenizer:
    """A model's tokenizer with what the gateway needs from it."""

    tokenizer: Any
    eos_token_ids: list[int]
    vocab_size: int
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    """The model's own defaults for fields a request leaves out (generation_config.json)."""
    spelling: TokenSpelling = field(init=False, repr=False)
    added_ids: dict[str, int] = field(init=False, repr=False)
    """Each added token's text (special ones included, ``<|im_end|>``, ``</s>``) → its id."""
    _skipped: frozenset[int] = field(init=False, repr=False)  # the special ids decode skips

    def __post_init__(self) -> None:
        self.spelling = TokenSpelling(self.tokenizer)
        self.added_ids = added_token_ids(self.tokenizer, self.spelling.added)
        added = getattr(self.tokenizer, "added_tokens_decoder", None) or {}
        specials = getattr(self.tokenizer, "all_special_ids", None) or ()
        self._skipped = frozenset(
            {int(i) for i, token in added.items() if getattr(token, "special", False)}
            | {int(i) for i in specials}
        )

    def encode(self, text: str, special: bool = True) -> list[int]:
        """A completion prompt, with the model's usual special tokens (BOS) unless not
        ``special``."""
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation through the model's chat template, ready for the assistant's turn.

        Special tokens come from the template only: a message that spells one out (say
        ``<|im_start|>system``, to forge a role boundary) has it tokenized as plain text. Such a
        conversation is tokenized in pieces (template text, then each message's content on its
        own); any other is tokenized whole, exactly as transformers would. Raises
        TemplateRefusal when the template refuses the conversation."""
        if not any(self._spells_special(m.get("content")) for m in messages):
            # The template writes BOS and friends itself; do not add them twice.
            return list(
                self.tokenizer(self._render(messages), add_special_tokens=False)["input_ids"]
            )
        marks = [f"{CONTENT_MARK}{i}{CONTENT_MARK}" for i in range(len(messages))]
        text = self._render(
            [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
        )
        ids: list[int] = []
        at = 0
        for found in MARKED.finditer(text):
            ids += self.tokenizer(text[at : found.start()], add_special_tokens=False)["input_ids"]
            content = messages[int(found.group(1))]["content"]
            ids += self.tokenizer(content, add_special_tokens=False, split_special_tokens=True)[
                "input_ids"
            ]
            at = found.end()
        ids += self.tokenizer(text[at:], add_special_tokens=False)["input_ids"]
        return ids

    def _render(self, messages: list[dict[str, str]]) -> str:
        template = None if getattr(self.tokenizer, "chat_template", None) else FALLBACK_TEMPLATE
        try:
            return str(self.tokenizer.apply_chat_template(
                messages, chat_template=template, add_generation_prompt=True, tokenize=False
            ))  # fmt: skip
        except jinja2.TemplateSyntaxError:
            raise  # the model's template is broken: no conversation is at fault
        except jinja2.TemplateError as exc:  # raise_exception, or what the messages lack
            raise TemplateRefusal(str(exc)) from exc

    def _spells_special(self, content: object) -> bool:
        specials = getattr(self.tokenizer, "all_special_tokens", [])
        added = getattr(self.tokenizer, "added_tokens_decoder", {})
        names = {*specials, *(t.content for t in added.values() if getattr(t, "special", False))}
        return isinstance(content, str) and any(name and name in content for name in names)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def output_bytes(self, token_id: int) -> bytes | None:
        """The bytes ``token_id`` adds to ``decode``'s output (b"" for a special token, which
        it skips); None where the vocabulary's spelling of bytes is unknown."""
        if self.spelling.spelling == "text":
            return None
        return b"" if token_id in self._skipped else self.spelling.bytes_of(token_id)

    def spelled_token_ids(self, texts: Sequence[str]) -> list[int]:
        """The ids of the texts that are exactly one added or special token's text (stop
        strings: ``decode`` skips special tokens, so such a stop string never shows in the
        text and can stop generation only as a token id)."""
        return [self.added_ids[text] for text in texts if text in self.added_ids]

    def token_bytes(self, token_id: int) -> bytes:
        """One token's own bytes, for logprobs (part of a character, a leading space kept)."""
        return self.spelling.bytes_of(token_id)

    def token_text(self, token_id: int) -> str:
        """One token as logprobs name it: its text, or ``bytes:\\xNN…`` when its bytes are
        not valid UTF-8 on their own."""
        return token_label(self.token_bytes(token_id))


def added_token_ids(tokenizer: Any, added: dict[int, str]) -> dict[str, int]:
    """A tokenizer's added tokens (text → id): ``added`` (its ``added_tokens_decoder``, id →
    text, as ``TokenSpelling`` reads it) and any named special token that is in the vocabulary
    without being added (a slow tokenizer's ``</s>``)."""
    found = {text: token_id for token_id, text in added.items()}
    for name in getattr(tokenizer, "all_special_tokens", []):
        if name in found:
            continue
        token_id = tokenizer.convert_tokens_to_ids(name)
        if isinstance(token_id, int) and tokenizer.convert_ids_to_tokens(token_id) == name:
            found[name] = token_id  # not the unknown token's id that a missing name maps to
    return found


def load_tokenizer(folder: Path) -> ModelTokenizer:
    """Load from a Hugging Face layout folder (blocking)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    defaults = sampling_defaults(folder)
    return ModelTokenizer(tokenizer, eos_ids(folder, tokenizer), len(tokenizer), defaults)


SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k")
"""generation_config.json fields that stand in for a request's missing ones (as vLLM does)."""


def sampling_defaults(folder: Path) -> dict[str, float]:
    """The model's default sampling values, from generation_config.json: only numbers in range
    are taken (a bad file changes nothing rather than failing every request)."""
    path = folder / "generation_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        log.warning("%s: unreadable; no default sampling values", path)
        return {}
    limits = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "top_k": (0, 1 << 20)}
    out: dict[str, float] = {}
    for key in SAMPLING_DEFAULTS:
        value = config.get(key) if isinstance(config, dict) else None
        low, high = limits[key]
        if isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high:
            out[key] = value
    return out


def eos_ids(folder: Path, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: generation_config.json, then config.json, then the tokenizer."""
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if value is not None:
                return [value] if isinstance(value, int) else [int(v) for v in value]
    eos = getattr(tokenizer, "eos_token_id", None)
    return [] if eos is None else [int(eos)]


class TokenizerCache:
    """``await cache.get(info)`` → ModelTokenizer, loaded at most once per model."""

    def __init__(self, bus: Bus | None, cache_dir: Path) -> None:
        self.bus = bus
        self.cache_dir = cache_dir
        self._loaded: dict[str, ModelTokenizer] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, info: ModelInfo) -> ModelTokenizer:
        found = self._loaded.get(info.name)
        if found is not None:
            return found
        async with self._locks.setdefault(info.name, asyncio.Lock()):
            if info.name not in self._loaded:
                folder = await self._folder(info)
                self._loaded[info.name] = await asyncio.to_thread(load_tokenizer, folder)
            return self._loaded[info.name]

    def forget(self, model: str) -> None:
        """A removed model: its tokenizer goes (one deployed again under its name loads its
        own), with the files fetched for it."""
        self._loaded.pop(model, None)
        self._locks.pop(model, None)
        if _TOKEN.fullmatch(model):  # a model name: never a path out of the cache dir
            shutil.rmtree(self.cache_dir / model, ignore_errors=True)

    async def _folder(self, info: ModelInfo) -> Path:
        local = Path(info.path)
        if (local / "tokenizer.json").is_file() or (local / "tokenizer_config.json").is_file():
            return local
        return await self._fetch(info.name)

    async def _fetch(self, model: str) -> Path:
        """Copy the tokenizer files from the model-store (another node) into the cache dir."""
        from aegaeon.model_store.files import fetch_file

        if self.bus is None:
            raise FileNotFoundError(f"model {model!r}: no local tokenizer and no bus to fetch it")
        folder = self.cache_dir / model
        folder.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            try:
                data = await fetch_file(self.bus, model, name)
            except FileNotFoundError:
                continue
            await asyncio.to_thread((folder / name).write_bytes, data)
        return folder
