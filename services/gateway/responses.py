"""OpenAI response objects and SSE chunks, built from Pieces (pure).

Streams look exactly like OpenAI's: a chat stream opens with a role delta, sends content
deltas, ends with an empty delta carrying ``finish_reason``; with ``include_usage`` every chunk
has ``"usage": null`` and one last chunk has no choices and the usage; then ``data: [DONE]``.
Before the first token, comment lines say where the request waits (queued, loading weights).
"""

from __future__ import annotations

import codecs
import json
from typing import Any

from aegaeon.protocol import RequestStatus

from .generation import Piece
from .output_text import Logprob
from .prepare import Prepared
from .token_bytes import token_label
from .tokenization import ModelTokenizer

DONE = "data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


def sse_comment(status: RequestStatus) -> str:
    """Where a request waits, as an SSE comment line (``: aegaeon queued position=2``):
    valid SSE that clients which do not look for it, the official openai one included, skip."""
    fields = {"position": status.position, "model": status.model,
              "bytes_done": status.bytes_done, "bytes_total": status.bytes_total}  # fmt: skip
    text = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    return f": aegaeon {status.state} {text}".rstrip() + "\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """``completion_tokens``: the tokens the engine generated, a stop string's and the EOS
    token included (as vLLM counts them, and as the key's token budget is charged), so it may
    exceed the tokens in logprobs, which end where the text does."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseBuilder:
    """Shapes one choice's Pieces into chunks, or into its part of a whole response
    (:func:`whole_response`)."""

    def __init__(self, prepared: Prepared) -> None:
        self.p = prepared
        self.chat = prepared.kind == "chat"
        self.object = "chat.completion" if self.chat else "text_completion"
        self._offsets = TextOffsets()  # completions' text_offset, across a stream's chunks

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.p.response_id,
            "object": obj,
            "created": self.p.created,
            "model": self.p.model.name,
            "choices": choices,
        }
        if self.p.stream and self.p.include_usage:
            out["usage"] = None
        return out

    # ------------------------------------------------------------ streaming

    def first_chunk(self) -> str | None:
        """Chat streams start with the role (OpenAI sends it before any content)."""
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": ""}
        choice = {"index": self.p.choice, "delta": delta, "logprobs": None}
        choice["finish_reason"] = None
        return sse(self._envelope("chat.completion.chunk", [choice]))

    def chunk(self, piece: Piece) -> str | None:
        """A piece as chunks: its text, then (chat) an empty delta with the finish reason."""
        out = ""
        logprobs = self.logprobs(piece)
        if piece.text or logprobs is not None:
            out += sse(self._envelope(self._chunk_object(), [self._choice(piece.text, logprobs)]))
        if piece.finish_reason is not None:
            end = self._choice("", None, piece.finish_reason, empty=True)
            out += sse(self._envelope(self._chunk_object(), [end]))
        return out or None

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> str:
        body = self._envelope(self._chunk_object(), [])
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return sse(body)

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def _choice(
        self, text: str, logprobs: Any, finish: str | None = None, empty: bool = False
    ) -> dict[str, Any]:
        index = self.p.choice
        if self.chat:
            delta = {} if empty else {"content": text}
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    # ------------------------------------------------------------ whole response

    def whole_choice(self, pieces: list[Piece]) -> dict[str, Any]:
        """This choice of a whole response, from all its pieces."""
        text = "".join(p.text for p in pieces)
        finish = next((p.finish_reason for p in reversed(pieces) if p.finish_reason), None)
        # Each piece's tokens and logprobs are paired, so the concatenations stay paired.
        merged = Piece(text, [t for p in pieces for t in p.token_ids], [])
        merged.logprobs = [lp for p in pieces for lp in p.logprobs]
        self._offsets = TextOffsets()
        logprobs = self.logprobs(merged)
        index = self.p.choice
        if self.chat:
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}  # fmt: skip
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    # ------------------------------------------------------------ logprobs

    def logprobs(self, piece: Piece) -> dict[str, Any] | None:
        """The piece's tokens with their logprobs, in OpenAI's chat or completion shape. A token
        without a logprob (refilled from Redis after a bus restart) keeps its place, so the list
        still spells the text: chat gives it ``"logprob": null`` and no alternatives, completions
        ``null`` in ``token_logprobs`` and ``top_logprobs`` (as OpenAI's completions do for the
        echoed first prompt token, which has none)."""
        if self.p.top_logprobs is None or not piece.token_ids:
            return None
        tok = self.p.tokenizer
        pairs = list(zip(piece.token_ids, piece.logprobs, strict=True))
        if self.chat:
            return {"content": [_chat_logprob(tok, t, lp) for t, lp in pairs]}
        return self._completion_logprobs(tok, pairs)

    def _completion_logprobs(self, tok: ModelTokenizer, pairs: list[tuple[int, Logprob | None]]):
        tokens, chosen, tops, offsets = [], [], [], []
        for token_id, entry in pairs:
            raw = tok.token_bytes(token_id)
            tokens.append(token_label(raw))
            chosen.append(None if entry is None else entry[0])
            tops.append(None if entry is None else {tok.token_text(t): lp for t, lp in entry[1]})
            offsets.append(self._offsets.add(raw))
        return {
            "tokens": tokens,
            "token_logprobs": chosen,
            "top_logprobs": tops,
            "text_offset": offsets,
        }


def whole_response(
    builders: list[ResponseBuilder], pieces: list[list[Piece]], prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:  # fmt: skip
    """The whole response: one choice per builder (in choice order) from its pieces, and the
    usage of them all (``completion_tokens``: what the engine generated for every choice;
    ``prompt_tokens``: each prompt once, as OpenAI counts it)."""
    first = builders[0]
    whole = [b.whole_choice(p) for b, p in zip(builders, pieces, strict=True)]
    body = first._envelope(first.object, whole)
    body["usage"] = usage(prompt_tokens, completion_tokens)
    return body


class TextOffsets:
    """Where each token begins in the text (characters), from the tokens' bytes: a token that
    continues a character begun by the one before it begins where that character does."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._chars = 0

    def add(self, raw: bytes) -> int:
        begins = self._chars
        self._chars += len(self._decoder.decode(raw))
        return begins


def _chat_logprob(tok: ModelTokenizer, token_id: int, entry: Logprob | None) -> dict[str, Any]:
    def one(tid: int, lp: float | None) -> dict[str, Any]:
        raw = tok.token_bytes(tid)
        return {"token": token_label(raw), "logprob": lp, "bytes": list(raw)}

    if entry is None:
        return {**one(token_id, None), "top_logprobs": []}
    logprob, top = entry
    return {**one(token_id, logprob), "top_logprobs": [one(t, lp) for t, lp in top]}
