"""One request's output as its client sees it: text deltas and the tokens behind them (pure).

The engine's tokens are not all output. A stop string ends the output (it and all after it are
dropped, tokens the worker generated meanwhile included), and a stop token (EOS, or the token a
stop string spells: prepare.py) ends it without being part of it, neither its text nor its
logprob. The tokens a client is given with the text (for logprobs) end where the text ends, and
while text is held back (part of a character, what may begin a stop string) its tokens wait with
it, so no streamed token is one the output turns out not to have.

A token is output when its text begins before the output ends: of " END" cut by the stop string
"END", the token " E" is kept (it brings the space) and "N", "D" are not. A token's text begins
where the decoded output stood when the token came: one that came while the detokenizer held text
back (an unfinished character) counts from where that held text begins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .detokenizer import ByteRun, Decode, IncrementalDetokenizer, StopMatcher, TokenBytes

Logprob = tuple[float, list[tuple[int, float]]]
"""A token's logprob and its top alternatives (token id, logprob)."""


@dataclass
class Delta:
    """New output: text that is certain and the tokens behind it, with one logprob per token
    (None where none is known)."""

    text: str
    token_ids: list[int]
    logprobs: list[Logprob | None]


@dataclass
class _Held:
    token_id: int
    logprob: Logprob | None
    begins: int  # where its text begins in the decoded output (characters)


class OutputText:
    """Feed each event's tokens in order; ``stopped`` once a stop string ended the output."""

    def __init__(
        self, decode: Decode, stops: Sequence[str], stop_token_ids: Sequence[int],
        token_bytes: TokenBytes | None = None, byte_run: ByteRun | None = None,
    ) -> None:  # fmt: skip
        self.detok = IncrementalDetokenizer(decode, token_bytes, byte_run)
        self.stop = StopMatcher(stops)
        self.stop_token_ids = frozenset(stop_token_ids)
        self._held: list[_Held] = []  # tokens whose text the client has not been given yet
        self._shown = 0  # characters the client has been given

    @property
    def stopped(self) -> bool:
        """A stop string ended the output (the worker may still be generating)."""
        return self.stop.stopped

    def feed(
        self, token_ids: Sequence[int], logprobs: Sequence[Logprob | None], finish: str | None
    ) -> Delta:
        """One event's tokens (a logprob each) and the engine's finish reason if it ended."""
        text = ""
        last = len(token_ids) - 1
        for i, (token_id, logprob) in enumerate(zip(token_ids, logprobs, strict=True)):
            if self.stop.stopped:
                break  # generated after the stop string: not output
            if i == last and finish == "stop" and token_id in self.stop_token_ids:
                break  # the stop token: neither its text (an added token's shows) nor its logprob
            self._held.append(_Held(token_id, logprob, len(self.detok.emitted)))
            text += self.stop.feed(self.detok.feed([token_id]))
        ended = finish is not None and not self.stop.stopped
        if ended:
            text += self.stop.feed(self.detok.finish()) + self.stop.flush()
        self._shown += len(text)
        return self._release(text, everything=ended)

    def _release(self, text: str, everything: bool) -> Delta:
        """The held tokens whose text has begun to show (all of them once the output ended
        without a stop string); after a stop string, the rest are dropped."""
        count = len(self._held)
        if not everything:
            count = next((i for i, h in enumerate(self._held) if h.begins >= self._shown), count)
        out, self._held = self._held[:count], [] if self.stop.stopped else self._held[count:]
        return Delta(text, [h.token_id for h in out], [h.logprob for h in out])
