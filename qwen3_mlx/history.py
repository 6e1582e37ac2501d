"""The conversation as turns, and the message list the chat template gets from them.

A turn is one reply and what it answered: a user message, or the results of the tool calls the
previous reply made. Plain chat history holds final answers only; inside a tool loop each reply
also passes its thinking as `reasoning_content`, which the Qwen3 template keeps after the last
real user message and drops before it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from qwen3_mlx.events import TurnResult
from qwen3_mlx.tools import ToolCall, ToolResult


@dataclass(frozen=True)
class Turn:
    """One reply and its input: the user's text (None inside a tool loop) or tool results."""

    user: str | None
    answer: str = ""
    thinking: str = ""
    thinking_finished: bool = True
    finish_reason: str = "stop"
    tool_calls: tuple[ToolCall, ...] = ()
    tool_results: tuple[ToolResult, ...] = ()

    @property
    def interrupted(self) -> bool:
        """Whether the reply was cut off by the user."""
        return self.finish_reason == "interrupted"

    @property
    def in_tool_loop(self) -> bool:
        """Whether this reply made tool calls or answered tool results."""
        return bool(self.tool_calls or self.tool_results)

    def answered_by(self, result: TurnResult) -> Turn:
        """This turn with the reply that answered it: every field a TurnResult shares with it."""
        return replace(self, **{name: getattr(result, name) for name in _FROM_RESULT})

    @property
    def valid_calls(self) -> tuple[ToolCall, ...]:
        """The calls that parsed (the ones a tool can run and the template can render)."""
        return tuple(call for call in self.tool_calls if call.valid)


# answer, thinking, thinking_finished, finish_reason, tool_calls: what a reply decides of a turn.
_FROM_RESULT = tuple(
    name for name in (f.name for f in fields(Turn)) if name in TurnResult.__dataclass_fields__
)


def history_messages(system: str | None, turns: list[Turn]) -> list[dict[str, Any]]:
    """The messages the template gets: answers, plus thinking and calls inside tool loops."""
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    for turn in turns:
        if turn.user is not None:
            messages.append({"role": "user", "content": turn.user})
        messages.extend(result.message() for result in turn.tool_results)
        messages.append(assistant_message(turn))
    return messages


def assistant_message(turn: Turn) -> dict[str, Any]:
    """One reply as the template renders it back."""
    message: dict[str, Any] = {"role": "assistant", "content": turn.answer}
    if turn.in_tool_loop:
        message["reasoning_content"] = turn.thinking
    elif "</think>" in turn.answer:
        # The templates split content at the text "</think>" unless reasoning_content is given;
        # an answer that merely spells it must stay whole.
        message["reasoning_content"] = ""
    if turn.tool_calls:
        # Invalid calls are kept too (name as parsed, the raw text as arguments), so the model
        # can be told what was wrong with them in a tool result; nothing it wrote is dropped.
        message["tool_calls"] = [call.message() for call in turn.tool_calls]
    return message
