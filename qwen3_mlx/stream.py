"""The streaming layer over generate.py: think/answer split, detokenized text, stop rules, stats.

Token ids go in; ThinkingText and AnswerText pieces come out, never half a UTF-8 character (mlx-lm's
streaming detokenizer holds bytes back). A reply ends on a stop id, at max tokens, when the
repetition guard fires, or when the consumer stops iterating.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from qwen3_mlx.events import (
    AnswerText,
    ReplyEvent,
    ThinkingText,
    ToolCallEvent,
    ToolCallText,
    TurnResult,
)
from qwen3_mlx.generate import GeneratedToken
from qwen3_mlx.thinking import Part, Phase, ThinkParser
from qwen3_mlx.tools import ToolCall, parse_call


@dataclass(frozen=True)
class RepetitionGuard:
    """End a reply whose last tokens are one block repeated `repeats` times in a row.

    Every block length from 1 to max_block is watched at once, whatever the offset where the loop
    began; the repeated stretch must also span at least min_tokens, so short legitimate patterns
    (a table rule, a few identical tokens) never trip it.
    """

    max_block: int = 256
    repeats: int = 4
    min_tokens: int = 64

    def __post_init__(self) -> None:
        if self.max_block < 1 or self.repeats < 2 or self.min_tokens < 1:
            raise ValueError("RepetitionGuard needs max_block >= 1, repeats >= 2, min_tokens >= 1")

    def tracker(self) -> RepetitionTracker:
        """A fresh detector for one reply."""
        return RepetitionTracker(self)


class RepetitionTracker:
    """Per block length p, the run of recent tokens equal to the token p places back.

    A run of (repeats - 1) * p means the last repeats * p tokens are one p-token block repeated.
    Each token costs one vectorized pass over max_block counters, independent of the reply length
    (a rescan of the reply for every possible period would cost O(length * max_block)).
    """

    def __init__(self, guard: RepetitionGuard):
        self.size = guard.max_block
        self.periods = np.arange(1, self.size + 1)
        self.needed = np.maximum(
            (guard.repeats - 1) * self.periods, guard.min_tokens - self.periods
        )
        self.recent = np.full(self.size, -1, dtype=np.int64)  # ring buffer of the last tokens
        self.runs = np.zeros(self.size, dtype=np.int64)
        self.count = 0

    def add(self, token: int) -> bool:
        """Record one token; True when the reply has started to loop."""
        back = self.recent[(self.count - self.periods) % self.size]
        self.runs = np.where(back == token, self.runs + 1, 0)
        self.recent[self.count % self.size] = token
        self.count += 1
        return bool((self.runs >= self.needed).any())


class SectionText:
    """The detokenized text of one section (thinking or answer), trimmed of edge newlines.

    Leading newlines and spaces are dropped and trailing newlines held back until more text
    follows, so the `\\n` around the think block and before <|im_end|> never reach the screen.
    """

    def __init__(self, tokenizer: Any):
        self.detokenizer = tokenizer.new_detokenizer()
        self.read = 0
        self.held = ""
        self.pieces: list[str] = []
        self.ids: list[int] = []

    def add(self, token: int) -> str:
        """Feed one token; return the text that may be shown now (often empty)."""
        self.ids.append(token)
        self.detokenizer.add_token(token)
        return self._take()

    def finish(self) -> str:
        """Flush what the detokenizer held back; return the last piece to show."""
        self.detokenizer.finalize()
        piece = self._take()
        self.held = ""
        return piece

    @property
    def text(self) -> str:
        """Everything shown so far."""
        return "".join(self.pieces)

    def _take(self) -> str:
        new = self.detokenizer.text[self.read :]
        self.read += len(new)
        if not self.pieces and not self.held:
            # Leading spaces go too: mlx-lm's detokenizer drops one only when it flushes (an
            # SentencePiece habit), so only dropping all of them gives the same text every way.
            new = new.lstrip(" \n")
        text = self.held + new
        shown = text.rstrip("\n")
        self.held = text[len(shown) :]
        if shown:
            self.pieces.append(shown)
        return shown


class ReplyStream:
    """One reply: label tokens by the think parser, detokenize each section, and decide the end."""

    def __init__(
        self,
        tokenizer: Any,
        phase: Phase,
        stop_ids: Iterable[int],
        guard: RepetitionGuard | None = None,
        *,
        tools: bool = False,
    ):
        self.tokenizer = tokenizer
        self.parser = ThinkParser(phase, tools=tools)
        self.stop_ids = frozenset(stop_ids)
        self.tracker = guard.tracker() if guard is not None else None
        self.thinking = SectionText(tokenizer)
        self.answer = SectionText(tokenizer)
        self.tokens: list[int] = []
        self.parts: list[Part] = []  # the part each token fell in (a stop token has none)
        self.finish_reason = "interrupted"  # until run() says otherwise
        self.first_seconds: float | None = None
        self.last_seconds = 0.0
        self.think_end_seconds: float | None = None
        self.thinking_tokens = 0
        self.calls: list[ToolCall] = []
        self.call_text: SectionText | None = None  # the body of the call being written
        self.target_steps = self.drafted = self.accepted = 0  # speculation counts (GeneratedToken)

    def run(self, generated: Iterable[GeneratedToken]) -> Iterator[ReplyEvent]:
        """Consume the token generator, yielding text pieces; sets finish_reason when it ends."""
        finish = "length"
        for item in generated:
            self._time(item.seconds)
            self.tokens.append(item.token)
            self.target_steps += item.target_step
            self.drafted += item.drafted
            self.accepted += item.accepted
            if item.token in self.stop_ids:
                finish = "stop"
                break
            event = self._label(item.token, item.seconds)
            if event is not None:
                yield event
            if self.tracker is not None and self.tracker.add(item.token):
                finish = "repetition"
                break
        if finish == "stop" and any(call.valid for call in self.calls) and self.call_text is None:
            finish = "tool_calls"
        self.finish_reason = finish  # generation is over; only held-back text is left to yield
        yield from self.flush()

    def _time(self, seconds: float) -> None:
        if self.first_seconds is None:
            self.first_seconds = seconds
        self.last_seconds = seconds

    def _label(self, token: int, seconds: float) -> ReplyEvent | None:
        part = self.parser.feed(token)
        self.parts.append(part)
        if part in (Part.CALL_OPEN, Part.CALL, Part.CALL_CLOSE):
            return self._call_part(part, token)
        if part is Part.THINKING:
            self.thinking_tokens += 1
            text = self.thinking.add(token)
            return ThinkingText(text, self.thinking_tokens) if text else None
        if part is Part.ANSWER:
            text = self.answer.add(token)
            return AnswerText(text) if text else None
        if part is Part.CLOSE:
            self.think_end_seconds = seconds
            piece = self.thinking.finish()
            return ThinkingText(piece, self.thinking_tokens) if piece else None
        return None

    def _call_part(self, part: Part, token: int) -> ReplyEvent | None:
        index = len(self.calls)
        if part is Part.CALL_OPEN:
            self.call_text = SectionText(self.tokenizer)
            return None
        assert self.call_text is not None
        if part is Part.CALL:
            text = self.call_text.add(token)
            return ToolCallText(text, index) if text else None
        return self._end_call()

    def _end_call(self, error: str | None = None) -> ToolCallEvent:
        assert self.call_text is not None
        self.call_text.finish()
        body, self.call_text = self.call_text.text, None
        call = parse_call(body)
        if error is not None:
            call = ToolCall(call.id, call.name, body.strip(), None, error)
        self.calls.append(call)
        return ToolCallEvent(call, len(self.calls) - 1)

    def flush(self) -> Iterator[ReplyEvent]:
        """The text the detokenizers still hold back (an interrupted reply owes it too); a call
        left open becomes an invalid call."""
        if self.call_text is not None:
            yield self._end_call("the call was cut off before </tool_call>")
        thinking = self.thinking.finish()
        if thinking:
            yield ThinkingText(thinking, self.thinking_tokens)
        answer = self.answer.finish()
        if answer:
            yield AnswerText(answer)

    def result(self, prompt_tokens: int, prefilled_tokens: int) -> TurnResult:
        """The frozen record of this reply (call after run() ended or was cut off, and flush())."""
        first = self.first_seconds
        decode_seconds = self.last_seconds - first if first is not None else 0.0
        generated = len(self.tokens)
        if self.parser.saw_block and first is not None:
            end = (
                self.think_end_seconds if self.think_end_seconds is not None else self.last_seconds
            )
            thinking_seconds = max(end - first, 0.0)
        else:
            thinking_seconds = 0.0
        return TurnResult(
            finish_reason=self.finish_reason,
            answer=self.answer.text,
            thinking=self.thinking.text,
            thinking_finished=self.parser.thinking_finished,
            prompt_tokens=prompt_tokens,
            prefilled_tokens=prefilled_tokens,
            generated_tokens=generated,
            thinking_tokens=self.thinking_tokens,
            time_to_first_token=first or 0.0,
            prefill_tokens_per_second=prefilled_tokens / first if first else 0.0,
            decode_tokens_per_second=(generated - 1) / decode_seconds
            if decode_seconds > 0
            else 0.0,
            thinking_seconds=thinking_seconds,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            tool_calls=tuple(self.calls),
            target_steps=self.target_steps,
            drafted_tokens=self.drafted,
            accepted_tokens=self.accepted,
        )
