"""The choices of one completion request (``n`` per prompt), answered together.

Each choice is a Generation of its own (its own request to the scheduler, admission slot and
token budget). ``Choices.pieces()`` gives their output as it comes, each piece with its choice's
index; a failure of any choice ends the whole answer (OpenAI's error shape has no per-choice
form), and ``close()`` ends every choice still running. With one choice nothing runs beside the
caller: its pieces are read directly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from .generation import Generation, Piece

_END = object()  # a choice's feeder is done


class Choices:
    """Use ``pieces()``, then ``close()`` in a ``finally`` (shielded from cancellation)."""

    def __init__(self, generations: list[Generation]) -> None:
        self.generations = generations
        self._feeders: list[asyncio.Task] = []

    @property
    def first(self) -> Generation:
        return self.generations[0]

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the request's prompts, each counted once (as OpenAI's usage counts them),
        however many choices it has."""
        return sum({g.p.prompt_index: len(g.p.prompt_ids) for g in self.generations}.values())

    @property
    def output_tokens(self) -> int:
        """Tokens the engine generated for all the choices (what usage counts)."""
        return sum(g.timings.output_tokens for g in self.generations)

    async def pieces(self, statuses: bool = False) -> AsyncIterator[tuple[int, Piece]]:
        """(choice index, piece) until every choice has ended; the first failure is raised."""
        if len(self.generations) == 1:
            async for piece in self.first.pieces(statuses):
                yield 0, piece
            return
        queue: asyncio.Queue[tuple[int, object]] = asyncio.Queue()

        async def feed(index: int, generation: Generation) -> None:
            try:
                async for piece in generation.pieces(statuses):
                    queue.put_nowait((index, piece))
            except Exception as exc:  # raised to the reader, in its task
                queue.put_nowait((index, exc))
            queue.put_nowait((index, _END))

        self._feeders = [
            asyncio.create_task(feed(i, g), name=f"choice-{g.request_id}")
            for i, g in enumerate(self.generations)
        ]
        running = len(self._feeders)
        while running:
            index, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                assert isinstance(item, Piece)
                yield index, item

    async def close(self) -> None:
        """Every choice in its final state (cancelled at the worker if still running), then
        its reader stopped. A reader is cancelled until it ends: Python 3.11's
        ``asyncio.wait_for`` (``Generation._next_event``) swallows a cancellation that lands as
        the event it waits for arrives, and a reader left running would hold its task until the
        idle timeout."""
        for generation in self.generations:
            await generation.close()
        pending = {feeder for feeder in self._feeders if not feeder.done()}
        while pending:
            for feeder in pending:
                feeder.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)
