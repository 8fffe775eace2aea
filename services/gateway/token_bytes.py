"""Each token's own bytes, for logprobs (pure).

Decoding a token alone loses what makes it that token: a byte-level BPE token holding part of a
character, or a SentencePiece byte-fallback token (``<0xE6>``), decodes to U+FFFD, and a
SentencePiece decoder strips the space of ``▁w`` as if it began the text. Logprobs give each
token's true bytes instead (concatenated, they are the output's UTF-8), read off the vocabulary
entry the way the model's decoder reads it, and name the token OpenAI's way: its text when those
bytes are valid UTF-8 on their own, else ``bytes:\\xe6\\x97``.
"""

from __future__ import annotations

import json
import re
from functools import cache
from typing import Any, Literal

Spelling = Literal["byte_level", "sentencepiece", "text"]
"""How a vocabulary spells bytes: GPT-2's printable byte map (``Ġw``); SentencePiece's ``▁``
for a space and ``<0xNN>`` for a byte it has no piece for; or plain text (decoded alone)."""

SPACE_MARK = "\u2581"  # SentencePiece's "▁"
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@cache
def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's map back from the printable characters a byte-level vocabulary writes bytes with
    (``Ġ`` is the space byte) to the bytes: printable Latin-1 bytes stand for themselves, the
    others for 256 + their rank among them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    others = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return {char: byte for byte, char in chars.items()}


def token_label(raw: bytes) -> str:
    """A token's name in logprobs: its text, or OpenAI's ``bytes:\\xNN…`` for bytes that are not
    valid UTF-8 on their own (part of a character)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TokenSpelling:
    """A tokenizer's token ids → the bytes each token stands for."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.spelling = spelling_of(tokenizer)
        # Added tokens (specials such as <|im_end|>) are stored as their literal text.
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.added: dict[int, str] = {int(i): t.content for i, t in added.items()}

    def bytes_of(self, token_id: int) -> bytes:
        added = self.added.get(token_id)
        if added is not None:
            return added.encode()
        piece = self._piece(token_id)
        spelled = None if piece is None else self._spelled(piece)
        return spelled if spelled is not None else str(self.tokenizer.decode([token_id])).encode()

    def is_byte_piece(self, token_id: int) -> bool:
        """A SentencePiece byte-fallback token (``<0xE6>``): its decoder renders a run of them
        together."""
        if self.spelling != "sentencepiece" or token_id in self.added:
            return False
        piece = self._piece(token_id)
        return piece is not None and BYTE_PIECE.fullmatch(piece) is not None

    def _spelled(self, piece: str) -> bytes | None:
        """The bytes a vocabulary entry spells; None where its spelling cannot tell."""
        if self.spelling == "byte_level":
            table = gpt2_byte_decoder()
            return bytes(table[c] for c in piece) if all(c in table for c in piece) else None
        if self.spelling == "sentencepiece":
            byte = BYTE_PIECE.fullmatch(piece)  # byte fallback: <0xE6>
            if byte:
                return bytes([int(byte.group(1), 16)])
            return piece.replace(SPACE_MARK, " ").encode()
        return None

    def _piece(self, token_id: int) -> str | None:
        try:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
        except (IndexError, KeyError, TypeError, ValueError, OverflowError):
            return None
        return piece if isinstance(piece, str) else None


def spelling_of(tokenizer: Any) -> Spelling:
    """Read off the tokenizer's decoder (tokenizers' JSON): ByteLevel decodes GPT-2's byte map;
    ByteFallback, Metaspace or a ``▁`` → space Replace mark SentencePiece; anything else (or a
    tokenizer without a ``tokenizers`` backend) is decoded token by token."""
    try:
        decoder = tokenizer.backend_tokenizer.decoder
        # Pickling state is the decoder's own JSON (its Python object hides a Sequence's parts).
        described = json.loads(decoder.__getstate__()) if decoder is not None else {}
    except (AttributeError, TypeError, ValueError):
        return "text"
    parts = described.get("decoders") or [described]
    kinds = {part.get("type") for part in parts if isinstance(part, dict)}
    if "ByteLevel" in kinds:
        return "byte_level"
    replaces_mark = any(
        part.get("type") == "Replace" and part.get("pattern", {}).get("String") == SPACE_MARK
        for part in parts
        if isinstance(part, dict)
    )
    if kinds & {"ByteFallback", "Metaspace"} or replaces_mark:
        return "sentencepiece"
    return "text"
