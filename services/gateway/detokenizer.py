"""Incremental detokenization and stop strings (pure, no I/O).

Tokens arrive a few at a time; the client must see text as soon as it is certain. Two things make
text uncertain:

* a token may end in the middle of a multi-byte UTF-8 character (byte-level BPE): the decoder
  then yields U+FFFD for a character that may still complete, which must never reach the
  client, so that text is held back;
* decoders that treat a token differently at the start of a string (SentencePiece's leading
  space), so decoding a window of tokens alone is not the same as decoding them in context.

Like vLLM, we decode a small window ``ids[prefix:]`` and subtract the text of
``ids[prefix:read]`` (the context already emitted), which keeps each step O(window). The window is
trusted when its context decodes alone to exactly the text it was emitted as (``prefix`` is always
an earlier emission boundary, so that text is known) and the window extends it; otherwise we fall
back to decoding everything. ``finish()`` reconciles with a full decode, so the concatenated
deltas always equal ``tokenizer.decode(all_ids)``.

A U+FFFD at the end is not always an unfinished character: bytes no later byte can make valid
(a stray continuation byte, an invalid lead) decode to U+FFFD for good. Given each token's bytes
(``token_bytes``), the detokenizer follows the output's UTF-8 and holds text back only while its
bytes end inside a character that may still complete; a run of broken bytes streams as it comes
instead of showing nothing until the end. Without them (a tokenizer whose spelling of bytes is
unknown), every trailing U+FFFD is taken as unfinished.

SentencePiece's byte fallback (``<0xE4>``) decodes a whole run of byte tokens at once: valid UTF-8
becomes its characters, anything else one U+FFFD per byte, so a broken byte at the end of a run
turns the characters before it into U+FFFD too. Text is held back while the output ends inside
such a run (``byte_run``) and comes when the run ends.

Two inputs once made every step a full decode (quadratic on the event loop): whitespace-only
output (whose context is never trusted) and output that keeps ending in a literal U+FFFD (which
looks like an unfinished character forever). Past HOLD_CHECK_TOKENS held tokens, or that many
full decodes in a row, text is decoded again only each time the tokens held double, so the work
stays O(n log n) in all; the held text comes with the next check or ``finish()``.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]
"""``ids -> text`` (e.g. ``lambda ids: tok.decode(ids, skip_special_tokens=True)``)."""
TokenBytes = Callable[[int], "bytes | None"]
"""``id -> the bytes it adds to the decoded output`` (b"" for a token ``decode`` skips; None
where they cannot be told)."""
ByteRun = Callable[[int], bool]
"""``id -> whether it is a byte-fallback token``, decoded with the run of them it belongs to."""

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5
"""Tokens of already-emitted context kept in the decode window (at least)."""
HOLD_CHECK_TOKENS = 16
"""Held tokens (text ending in U+FFFD), or full decodes in a row, tolerated at every step;
beyond, text is decoded again at each doubling of the tokens held. (Byte-level BPE tokens can
straddle characters, so a real character may take several tokens.)"""


class IncrementalDetokenizer:
    """Turns token ids, fed in order, into text deltas that never split a character."""

    def __init__(
        self, decode: Decode, token_bytes: TokenBytes | None = None,
        byte_run: ByteRun | None = None,
    ) -> None:  # fmt: skip
        self._decode = decode
        self._token_bytes = token_bytes
        self._byte_run = byte_run
        # The output's UTF-8, followed byte by byte (None: bytes unknown); what it buffers is an
        # unfinished character.
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace") if token_bytes else None
        self._last_sizes: list[int] = []  # bytes of the last few tokens, oldest first
        self.ids: list[int] = []
        self.emitted = ""
        self._read = 0
        # Emission boundaries (token index, len(emitted) there), oldest first; the first one is
        # the window's start.
        self._boundaries: list[tuple[int, int]] = [(0, 0)]
        self._next_check = 0  # held tokens before the window is decoded again
        self._fallbacks = 0  # full decodes in a row

    def feed(self, token_ids: Sequence[int]) -> str:
        """Add tokens; return the new text that is now certain ("" if none)."""
        self.ids.extend(token_ids)
        self._follow_bytes(token_ids)
        if self._byte_run is not None and self.ids and self._byte_run(self.ids[-1]):
            return ""  # inside a run of byte tokens: its text is known when the run ends
        held = len(self.ids) - self._read
        if held < self._next_check:
            return ""
        prefix, offset = self._boundaries[0]
        end = len(self.ids)
        window = self._decode(self.ids[prefix:])
        if window.endswith(REPLACEMENT) and self._unfinished():
            # The text up to the token where the unfinished character begins is certain; the
            # rest waits for the next token.
            end = self._unfinished_from() or 0
            if end <= self._read:
                if held >= HOLD_CHECK_TOKENS:
                    self._next_check = 2 * held
                return ""
            window = self._decode(self.ids[prefix:end])
        context = self.emitted[offset:]  # how ids[prefix:read] read in full
        if prefix == 0 or self._trusted(window, context, prefix):
            delta = window[len(context) :]
            self._fallbacks = self._next_check = 0
        else:
            full = self._full_delta(end)
            if full is None:
                return ""
            delta = full
            self._fallbacks += 1
            if self._fallbacks >= HOLD_CHECK_TOKENS:  # e.g. whitespace-only output
                self._next_check = max(HOLD_CHECK_TOKENS, 2 * held)
        self.emitted += delta
        self._advance(end)
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

    def _follow_bytes(self, token_ids: Sequence[int]) -> None:
        if self._utf8 is None or self._token_bytes is None:
            return
        for token_id in token_ids:
            raw = self._token_bytes(token_id)
            if raw is None:  # from here on, unknown: a trailing U+FFFD may be unfinished
                self._utf8 = None
                return
            self._utf8.decode(raw)
            self._last_sizes = [*self._last_sizes[-7:], len(raw)]

    def _unfinished(self) -> bool:
        """Whether text ending in U+FFFD may still change: its bytes end inside a character
        (or are unknown)."""
        return self._utf8 is None or bool(self._utf8.getstate()[0])

    def _unfinished_from(self) -> int | None:
        """The index of the token whose bytes begin the unfinished character, when a token
        begins it (None: bytes unknown, or it begins inside a token)."""
        if self._utf8 is None:
            return None
        pending, seen, index = len(self._utf8.getstate()[0]), 0, len(self.ids)
        for size in reversed(self._last_sizes):
            if seen >= pending:
                break
            seen, index = seen + size, index - 1
        return index if seen == pending else None

    def _trusted(self, window: str, context: str, prefix: int) -> bool:
        """The window extends its context, and the context decodes alone to the very text it
        was emitted as. A context of only whitespace is not trusted: a decoder that strips a
        leading space would strip the window's first space as if it began the output."""
        return (
            context.strip() != ""
            and window.startswith(context)
            and self._decode(self.ids[prefix : self._read]) == context
        )

    def _full_delta(self, end: int | None = None) -> str | None:
        full = self._decode(self.ids[:end])
        if not full.startswith(self.emitted):
            return None
        return full[len(self.emitted) :]

    def _advance(self, end: int | None = None) -> None:
        """Record the boundary (after the tokens emitted, ``end``: all by default); the window
        starts at the latest boundary at least CONTEXT_TOKENS back (or the oldest there is)."""
        self._read = len(self.ids) if end is None else end
        self._boundaries.append((self._read, len(self.emitted)))
        keep = 0
        for i, (index, _) in enumerate(self._boundaries):
            if self._read - index >= CONTEXT_TOKENS:
                keep = i
        del self._boundaries[:keep]


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
