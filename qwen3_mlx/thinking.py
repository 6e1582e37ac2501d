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

# Qwen3 documents the two soft switches; the model follows the latest one in system or user text.
SOFT_SWITCH = re.compile(r"/(no_think|think)\b")


class Part(Enum):
    """What one generated token is: a think-block marker, reasoning, or answer."""

    OPEN = "open"
    CLOSE = "close"
    THINKING = "thinking"
    ANSWER = "answer"


class Phase(Enum):
    """Where a reply stands: before any output, inside <think>, or in the answer."""

    START = "start"
    THINKING = "thinking"
    ANSWER = "answer"


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
    """A streaming state machine that labels each generated token with its Part."""

    def __init__(self, phase: Phase = Phase.START):
        self.phase = phase
        self.opened_in_prompt = phase is Phase.THINKING
        self.saw_block = phase is Phase.THINKING

    def feed(self, token: int) -> Part:
        """Label one token and advance the phase."""
        if self.phase is Phase.START:
            if token == THINK_START_ID:
                self.phase, self.saw_block = Phase.THINKING, True
                return Part.OPEN
            self.phase = Phase.ANSWER
            if token == THINK_END_ID:  # an empty block whose <think> was never written
                self.saw_block = True
                return Part.CLOSE
            return Part.ANSWER
        if self.phase is Phase.THINKING:
            if token == THINK_END_ID:
                self.phase = Phase.ANSWER
                return Part.CLOSE
            return Part.THINKING
        return Part.ANSWER

    @property
    def thinking_finished(self) -> bool:
        """False while the reply is still inside an unclosed think block."""
        return self.phase is not Phase.THINKING


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
