"""Incremental detokenization and stop strings (pure, no I/O).

Tokens arrive a few at a time; the client must see text as soon as it is certain. Two things make
text uncertain:

* a token may end in the middle of a multi-byte UTF-8 character (byte-level BPE): the decoder
  then yields U+FFFD, which must never reach the client, so that text is held back;
* decoders that treat a token differently at the start of a string (SentencePiece's leading
  space), so decoding a window of tokens alone is not the same as decoding them in context.

Like vLLM, we decode a small window ``ids[prefix:]`` and subtract the text of
``ids[prefix:read]`` (the context already emitted), which keeps each step O(window). When the
window's text does not extend its context text (a decoder that is not prefix-stable there), we
fall back to decoding everything. ``finish()`` reconciles with a full decode, so the concatenated
deltas always equal ``tokenizer.decode(all_ids)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
"""``ids -> text`` (e.g. ``lambda ids: tok.decode(ids, skip_special_tokens=True)``)."""

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5
"""Tokens of already-emitted context kept in the decode window."""


class IncrementalDetokenizer:
    """Turns token ids, fed in order, into text deltas that never split a character."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self.emitted = ""
        self._prefix = 0
        self._read = 0

    def feed(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the new text that is now certain ("" if none)."""
        self.ids.extend(token_ids)
        window = self._decode(self.ids[self._prefix :])
        if window.endswith(REPLACEMENT):
            return ""  # an unfinished character: wait for the next token
        context = self._decode(self.ids[self._prefix : self._read])
        if self._window_is_trustworthy(window, context):
            delta = window[len(context) :]
        else:
            full = self._full_delta()
            if full is None:
                return ""
            delta = full
        self._advance()
        self.emitted += delta
        return delta

    def finish(self) -> str:
        """The last text once no more tokens come (a trailing broken character included,
        exactly as ``decode`` renders it)."""
        delta = self._full_delta()
        if delta is None:
            return ""  # cannot happen with a deterministic decoder; never emit a rewrite
        self.emitted += delta
        self._advance()
        return delta

    def _window_is_trustworthy(self, window: str, context: str) -> bool:
        """The window's text extends its context, and the context reads as it did in full.

        A context of only whitespace is not trusted: decoders that strip a leading space may
        strip it from the context and the window differently.
        """
        return (
            context.strip() != ""
            and window.startswith(context)
            and self.emitted.endswith(context)
            and not context.endswith(REPLACEMENT)
        )

    def _full_delta(self) -> str | None:
        full = self._decode(self.ids)
        if not full.startswith(self.emitted):
            return None
        return full[len(self.emitted) :]

    def _advance(self) -> None:
        self._read = len(self.ids)
        self._prefix = max(0, self._read - CONTEXT_TOKENS)


class StopMatcher:
    """Finds stop strings in streamed text, holding back a tail that might begin one.

    OpenAI semantics: the stop string itself is not returned, and text after it is dropped.
    Text is cut where a stop string first completes, as if it were generated a character at a
    time, so the answer does not depend on how the text was split into deltas.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add text; return what can safely be sent. Sets ``stopped`` on a hit."""
        if self.stopped:
            return ""
        buffer = self._held + text
        hit = self._first_hit(buffer)
        if hit is not None:
            self.stopped = True
            self._held = ""
            return buffer[:hit]
        keep = self._partial_tail(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end of the output, the held tail is plain text after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_hit(self, buffer: str) -> int | None:
        """Where the output ends: at the stop string that *completes* first (generation would
        have stopped there), the longest one when several complete at the same character."""
        hits = [(i + len(s), i) for s in self.stops if (i := buffer.find(s)) >= 0]
        return min(hits)[1] if hits else None

    def _partial_tail(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
