"""Qwen3 tool calling: tool definitions, the calls a reply makes, and the results fed back.

A call is written by the model as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
(ids 151657 and 151658, split out by token id in thinking.py). Here the text between the markers
becomes a ToolCall that keeps the exact argument text the model wrote: sent back unchanged, the
template re-renders it to the same tokens, so the KV cache prefix holds through a tool loop.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qwen3_mlx.errors import ToolError

TOOL_CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class ToolCall:
    """One call from a reply; `error` is set (and `arguments` None) when its JSON is not valid."""

    id: str
    name: str
    arguments_text: str  # exactly as the model wrote it (the whole body for an invalid call)
    arguments: dict[str, Any] | None
    error: str | None = None

    @property
    def valid(self) -> bool:
        """Whether the call parsed into a name and an arguments object."""
        return self.error is None

    def message(self) -> dict[str, Any]:
        """The OpenAI `tool_calls` entry, with the argument text as written."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_text},
        }

    def describe(self) -> str:
        """`name(arguments)` for a person; an invalid call says why."""
        if self.valid:
            return f"{self.name}({self.arguments_text})"
        return f"invalid tool call ({self.error}): {self.arguments_text}"


@dataclass(frozen=True)
class ToolResult:
    """What a tool returned, for the call with id `tool_call_id` (None: matched by position)."""

    content: str
    tool_call_id: str | None = None
    name: str | None = None

    def message(self) -> dict[str, Any]:
        """The `role: tool` message the template turns into a <tool_response>."""
        message: dict[str, Any] = {"role": "tool", "content": self.content}
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


def new_call_id() -> str:
    """A fresh id for a call, in OpenAI's style."""
    return "call_" + secrets.token_hex(12)


def parse_call(body: str, call_id: str | None = None) -> ToolCall:
    """The ToolCall a `<tool_call>` body describes; never raises: a bad body is an invalid call."""
    call_id = call_id or new_call_id()
    text = body.strip()
    try:
        spans = _object_spans(text)
    except ValueError as error:
        return ToolCall(call_id, "", text, None, f"not a JSON object: {error}")
    name_span, arguments_span = spans.get("name"), spans.get("arguments")
    name = json.loads(text[slice(*name_span)]) if name_span else None
    if not isinstance(name, str) or not name:
        return ToolCall(call_id, "", text, None, 'no "name" string')
    if arguments_span is None:
        return ToolCall(call_id, name, text, None, 'no "arguments"')
    arguments_text = text[slice(*arguments_span)]
    arguments = json.loads(arguments_text)
    if not isinstance(arguments, dict):
        return ToolCall(call_id, name, text, None, '"arguments" is not a JSON object')
    return ToolCall(call_id, name, arguments_text, arguments)


def _object_spans(text: str) -> dict[str, tuple[int, int]]:
    """The (start, end) of each top-level value of a JSON object text, by key.

    json.loads gives values, not where they were written; the exact argument text is what keeps
    the cache prefix, so the object is walked here with the decoder's raw_decode.
    """
    decoder = json.JSONDecoder()
    spans: dict[str, tuple[int, int]] = {}
    index = _skip(text, 0)
    if not text.startswith("{", index):
        raise ValueError("it does not start with {")
    index = _skip(text, index + 1)
    if text.startswith("}", index):
        return _end_of_object(text, index, spans)
    while True:
        key, index = decoder.raw_decode(text, index)
        if not isinstance(key, str):
            raise ValueError("a key is not a string")
        index = _skip(text, index)
        if not text.startswith(":", index):
            raise ValueError(f"no ':' after key {key!r}")
        start = _skip(text, index + 1)
        _, end = decoder.raw_decode(text, start)
        spans[key] = (start, end)
        index = _skip(text, end)
        if text.startswith(",", index):
            index = _skip(text, index + 1)
        elif text.startswith("}", index):
            return _end_of_object(text, index, spans)
        else:
            raise ValueError(f"expected ',' or '}}' at character {index}")


def _end_of_object(text: str, index: int, spans: dict) -> dict[str, tuple[int, int]]:
    if _skip(text, index + 1) != len(text):
        raise ValueError("text follows the object")
    return spans


def _skip(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def check_tools(tools: Iterable[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """Tools in OpenAI's function format, checked; ToolError names the first bad one."""
    checked = []
    for position, tool in enumerate(tools or [], 1):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise ToolError(f'tool {position} must be {{"type": "function", "function": {{...}}}}')
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ToolError(f"tool {position} has no function name")
        parameters = function.get("parameters", {"type": "object"})
        if not isinstance(parameters, Mapping):
            raise ToolError(f"tool {function['name']!r}: parameters must be a JSON schema object")
        checked.append(dict(tool))
    names = [tool["function"]["name"] for tool in checked]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ToolError(f"tool names must be unique: {', '.join(duplicates)} given twice")
    return checked


def tool_choice_name(choice: Any, tools: Sequence[Mapping[str, Any]]) -> str:
    """'auto', 'none', 'required', or the name of the one function a call must use."""
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            raise ToolError(f"tool_choice must be one of {', '.join(TOOL_CHOICES)} or a function")
        if choice == "required" and not tools:
            raise ToolError("tool_choice 'required' needs at least one tool")
        return choice
    name = choice.get("function", {}).get("name") if isinstance(choice, Mapping) else None
    if not isinstance(name, str):
        raise ToolError('a named tool_choice is {"type": "function", "function": {"name": ...}}')
    if name not in {tool["function"]["name"] for tool in tools}:
        raise ToolError(f"tool_choice names {name!r}, which is not among the tools")
    return name


def order_results(
    results: Sequence[ToolResult], calls: Sequence[ToolCall]
) -> tuple[ToolResult, ...]:
    """Results in the order of the calls they answer (matched by id when given, else by position).

    The template renders results positionally, so a result sent out of order would answer the
    wrong call; one that answers no call of the reply is refused by id.
    """
    valid = list(calls)  # an invalid call is answered too: with the error, so the model can fix it
    if not valid:
        raise ToolError("the last reply made no tool call, so there is nothing to answer")
    if len(results) > len(valid):
        raise ToolError(f"{len(results)} tool results for {len(valid)} calls")
    by_id = {call.id: index for index, call in enumerate(valid)}
    if all(result.tool_call_id is None for result in results):
        return tuple(results)
    placed: dict[int, ToolResult] = {}
    for result in results:
        index = by_id.get(result.tool_call_id or "")
        if index is None:
            raise ToolError(
                f"the tool result for id {result.tool_call_id!r} answers no call of the last "
                f"reply (its calls: {', '.join(by_id)})"
            )
        if index in placed:
            raise ToolError(f"two tool results answer call {result.tool_call_id!r}")
        placed[index] = result
    return tuple(placed[index] for index in sorted(placed))


def flatten_content(content: Any) -> str:
    """Message content as the text the template expects: None -> "", content parts -> their text.

    The templates render non-string content as nothing, and the April-2025 one raises on it.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ToolError(f"content parts of type {kind!r} are not supported (text only)")
        return "".join(parts)
    raise ToolError(f"message content must be text or a list of text parts, not {content!r}")


def normalize_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages every Qwen3 template renders: string content, reasoning under reasoning_content.

    Accepts `reasoning` as well as `reasoning_content` (clients use both names).
    """
    normalized = []
    for message in messages:
        copy = dict(message)
        copy["content"] = flatten_content(message.get("content"))
        if "reasoning_content" not in copy and isinstance(copy.get("reasoning"), str):
            copy["reasoning_content"] = copy["reasoning"]
        copy.pop("reasoning", None)
        normalized.append(copy)
    return normalized
