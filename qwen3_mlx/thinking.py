"""Split a reply into thinking and answer by token id, and read the soft /think, /no_think switches.

The split works on token ids, never on text: only the special tokens <think> (151667) and
</think> (151668) open and close the reasoning, so an answer that merely spells "</think>" stays
text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any

from qwen3_mlx.tokenizer import IM_START_ID, THINK_END_ID, THINK_START_ID

TOOL_CALL_START_ID = 151657  # <tool_call>
TOOL_CALL_END_ID = 151658  # </tool_call>

# Qwen3 documents the two soft switches; the model follows the latest one in system or user text.
SOFT_SWITCH = re.compile(r"/(no_think|think)\b")


class Part(Enum):
    """What one generated token is: a think-block marker, reasoning, or answer."""

    OPEN = "open"
    CLOSE = "close"
    THINKING = "thinking"
    ANSWER = "answer"
    CALL_OPEN = "call_open"  # <tool_call>, after the think block
    CALL = "call"  # the body of a tool call
    CALL_CLOSE = "call_close"  # </tool_call>


class Phase(Enum):
    """Where a reply stands: before any output, inside <think>, in the answer, or in a call."""

    START = "start"
    THINKING = "thinking"
    ANSWER = "answer"
    CALL = "call"


def prompt_phase(prompt: Sequence[int]) -> Phase:
    """The phase a reply starts in, read from the generation prompt's own think tokens.

    Thinking-2507's prompt ends with an open `<think>\\n`, so the reply starts inside the block and
    carries only `</think>`; the hybrid template with enable_thinking=False writes a closed empty
    block, so the reply is all answer; otherwise the model may open a block itself.
    """
    start = _last_index(prompt, IM_START_ID) + 1
    opened = _last_index(prompt, THINK_START_ID, start)
    closed = _last_index(prompt, THINK_END_ID, start)
    if opened > closed:
        return Phase.THINKING
    if closed >= 0:
        return Phase.ANSWER
    return Phase.START


def _last_index(tokens: Sequence[int], token: int, start: int = 0) -> int:
    for index in range(len(tokens) - 1, start - 1, -1):
        if tokens[index] == token:
            return index
    return -1


class ThinkParser:
    """A streaming state machine that labels each generated token with its Part.

    With `tools`, <tool_call> … </tool_call> after the think block are calls; a <tool_call>
    written inside <think> is thinking text, never a call (the model drafts calls while reasoning).
    """

    def __init__(self, phase: Phase = Phase.START, *, tools: bool = False):
        self.phase = phase
        self.tools = tools
        self.opened_in_prompt = phase is Phase.THINKING
        self.saw_block = phase is Phase.THINKING
        self.calls = 0  # calls opened so far

    def feed(self, token: int) -> Part:
        """Label one token and advance the phase."""
        if self.phase is Phase.THINKING:
            if token == THINK_END_ID:
                self.phase = Phase.ANSWER
                return Part.CLOSE
            return Part.THINKING
        if self.phase is Phase.CALL:
            if token == TOOL_CALL_END_ID:
                self.phase = Phase.ANSWER
                return Part.CALL_CLOSE
            return Part.CALL
        if self.phase is Phase.START:
            if token == THINK_START_ID:
                self.phase, self.saw_block = Phase.THINKING, True
                return Part.OPEN
            self.phase = Phase.ANSWER
            if token == THINK_END_ID:  # an empty block whose <think> was never written
                self.saw_block = True
                return Part.CLOSE
        if self.tools and token == TOOL_CALL_START_ID:
            self.phase = Phase.CALL
            self.calls += 1
            return Part.CALL_OPEN
        return Part.ANSWER

    @property
    def thinking_finished(self) -> bool:
        """False while the reply is still inside an unclosed think block."""
        return self.phase is not Phase.THINKING

    @property
    def answering(self) -> bool:
        """Whether the next token would be answer text (not thinking, not inside a call)."""
        return self.phase in (Phase.ANSWER, Phase.START)


def segments(
    tokens: Iterable[int], phase: Phase = Phase.START, *, tools: bool = False
) -> list[tuple[Part, list[int]]]:
    """Consecutive tokens grouped by Part; joined in order, the ids are the stream again."""
    parser = ThinkParser(phase, tools=tools)
    grouped: list[tuple[Part, list[int]]] = []
    for token in tokens:
        part = parser.feed(token)
        if grouped and grouped[-1][0] is part and part in (Part.THINKING, Part.ANSWER, Part.CALL):
            grouped[-1][1].append(token)
        else:
            grouped.append((part, [token]))
    return grouped


def split_tokens(tokens: Iterable[int], phase: Phase = Phase.START) -> tuple[list[int], list[int]]:
    """(thinking ids, answer ids) of a finished token list; the markers themselves are dropped."""
    parser = ThinkParser(phase)
    thinking: list[int] = []
    answer: list[int] = []
    for token in tokens:
        part = parser.feed(token)
        if part is Part.THINKING:
            thinking.append(token)
        elif part is Part.ANSWER:
            answer.append(token)
    return thinking, answer


def latest_soft_switch(messages: Iterable[dict[str, Any]]) -> str | None:
    """'think' or 'no_think': the last soft switch in system or user text, or None."""
    latest = None
    for message in messages:
        if message.get("role") not in ("system", "user"):
            continue
        content = message.get("content")
        if isinstance(content, str):
            found = SOFT_SWITCH.findall(content)
            if found:
                latest = found[-1]
    return latest


def thinking_active(
    messages: Iterable[dict[str, Any]], hard_switch: bool, has_switch: bool
) -> bool:
    """Whether the next reply is expected to think: the hard switch, then the latest soft switch."""
    if not has_switch:
        return True  # Thinking-2507 always thinks and ignores the soft switches
    if not hard_switch:
        return False
    return latest_soft_switch(messages) != "no_think"
