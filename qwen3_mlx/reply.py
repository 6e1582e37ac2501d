"""The handle every front end drives: iterate a Reply for its text, then read `reply.result`.

One object and one route for the outcome, the habit of simonw/llm's `Response`: the REPL, `prompt`
and the server iterate the same Reply; none of them re-derives how a reply ended or what it cost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from qwen3_mlx.events import ReplyEvent, TurnResult
from qwen3_mlx.stream import ReplyStream
from qwen3_mlx.thinking import Part


class Reply:
    """One reply as it is generated.

    - Iterating yields ThinkingText and AnswerText pieces.
    - `result` (a TurnResult) is set when iteration ends, or when close() runs: Ctrl-C, a view that
      stops early, or the next send(). A closed reply is recorded in the history as interrupted.
    - After close(), iterating once more yields the text the detokenizer still held back (at most
      the end of a character or of a line), so a view can show exactly what the result holds.
    - Nothing happens until the first iteration: a reply closed before it changes nothing (its
      result says interrupted, with no tokens), and the history keeps what it had.
    """

    def __init__(
        self,
        stream: ReplyStream,
        start: Callable[[], Iterator[Any]],
        settle: Callable[[ReplyStream, bool], TurnResult],
    ):
        self._stream = stream
        self._start = start
        self._tokens: Iterator[Any] | None = None
        self._events: Iterator[ReplyEvent] | None = None
        self._settle = settle
        self._held_back: list[ReplyEvent] = []
        self.result: TurnResult | None = None

    def __iter__(self) -> Iterator[ReplyEvent]:
        if self.result is not None:
            held, self._held_back = self._held_back, []
            yield from held
            return
        if self._events is None:
            self._tokens = self._start()
            self._events = self._stream.run(self._tokens)
        try:
            yield from self._events
        except BaseException:  # Ctrl-C or an error mid-reply: keep what was generated
            self.close()
            raise
        self._end()

    def __enter__(self) -> Reply:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def tokens(self) -> Sequence[int]:
        """The token ids generated so far (stop token included once it came).

        A live view that grows as the reply runs (no copy per step); never change it.
        """
        return self._stream.tokens

    @property
    def parts(self) -> Sequence[Part]:
        """The part of the reply (thinking, answer, tool call, ...) each token fell in, as the
        stream's one think parser labelled it; a live view, one shorter after a stop token."""
        return self._stream.parts

    @property
    def done(self) -> bool:
        """Whether the reply has ended (result is set)."""
        return self.result is not None

    def close(self) -> None:
        """Stop generating, if still running, and record the reply; safe to call more than once."""
        if self.result is None and self._events is None:
            self.result = self._settle(self._stream, False)
        elif self.result is None:
            self._events.close()  # type: ignore[attr-defined]
            self._held_back = list(self._stream.flush())
            self._end()

    def text(self) -> str:
        """Run the reply to its end and return the answer (the thinking is in `result`)."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result.answer

    def _end(self) -> None:
        self._tokens.close()  # type: ignore[union-attr]
        self.result = self._settle(self._stream, True)
