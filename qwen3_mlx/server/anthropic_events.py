"""From a turn's deltas to Anthropic's content blocks and streamed events.

A stream and a plain answer come from the same builder: the plain message is what the stream's
events add up to, so the two cannot disagree.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from qwen3_mlx.server.turns import Delta, TurnEnd

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
BLOCK_KINDS = {"reasoning": "thinking", "text": "text", "call": "tool_use"}
# Anthropic's error type for each HTTP status this server answers with.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error object for a status and message."""
    return {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message},
    }


def anthropic_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """Anthropic usage from chat usage: input_tokens is the part the prefix cache did not hold."""
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    return {
        "input_tokens": usage["prompt_tokens"] - cached,
        "output_tokens": usage["completion_tokens"],
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


class MessageBuilder:
    """Content blocks and events of one message, block by block as the deltas arrive."""

    def __init__(self, message_id: str, model: str, prompt_tokens: int):
        self.message = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            # Which part of the prompt the cache held is known at the end (message_delta).
            "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
        }
        self.open: dict[str, Any] | None = None
        self.arguments: dict[int, str] = {}  # argument text of each tool_use block, by index
        self.blocks: dict[int, int] = {}  # the block index of each call

    def start(self) -> list[dict[str, Any]]:
        """message_start, with no content yet."""
        return [{"type": "message_start", "message": {**self.message, "content": []}}]

    def feed(self, delta: Delta) -> list[dict[str, Any]]:
        """The events of one delta (a new block is started when the kind changes)."""
        kind = BLOCK_KINDS.get(delta.kind)
        events = []
        if kind is not None and (kind == "tool_use" or (self.open or {}).get("type") != kind):
            events += self._stop()
            events += self._start(kind, delta)
        index = len(self.message["content"]) - 1
        if delta.kind == "reasoning":
            self.message["content"][index]["thinking"] += delta.text
            events.append(_delta(index, type="thinking_delta", thinking=delta.text))
        elif delta.kind == "text":
            self.message["content"][index]["text"] += delta.text
            events.append(_delta(index, type="text_delta", text=delta.text))
        elif delta.kind == "arguments":
            index = self.blocks[delta.call]
            self.arguments[index] += delta.text
            events.append(_delta(index, type="input_json_delta", partial_json=delta.text))
        return events

    def finish(self, end: TurnEnd) -> list[dict[str, Any]]:
        """The last block's stop, message_delta (stop reason, usage) and message_stop."""
        events = self._stop()
        reason = STOP_REASONS.get(end.finish_reason, "end_turn")
        if end.stop_sequence is not None:
            reason = "stop_sequence"
        usage = anthropic_usage(end.usage)
        self.message.update(stop_reason=reason, stop_sequence=end.stop_sequence, usage=usage)
        for index, text in self.arguments.items():
            self.message["content"][index]["input"] = _arguments(text)
        stop = {"stop_reason": reason, "stop_sequence": end.stop_sequence}
        events.append({"type": "message_delta", "delta": stop, "usage": usage})
        return [*events, {"type": "message_stop"}]

    def _start(self, kind: str, delta: Delta) -> list[dict[str, Any]]:
        if kind == "thinking":
            block = {"type": "thinking", "thinking": "", "signature": ""}
        elif kind == "text":
            block = {"type": "text", "text": ""}
        else:
            block = {"type": "tool_use", "id": delta.call_id, "name": delta.name, "input": {}}
            self.arguments[len(self.message["content"])] = ""
            self.blocks[delta.call] = len(self.message["content"])
        self.message["content"].append(block)
        self.open = block
        index = len(self.message["content"]) - 1
        return [{"type": "content_block_start", "index": index, "content_block": dict(block)}]

    def _stop(self) -> list[dict[str, Any]]:
        block, self.open = self.open, None
        if block is None:
            return []
        index = len(self.message["content"]) - 1
        events = []
        if block["type"] == "thinking":
            block["signature"] = signature(block["thinking"])
            events.append(_delta(index, type="signature_delta", signature=block["signature"]))
        return [*events, {"type": "content_block_stop", "index": index}]


def signature(thinking: str) -> str:
    """A thinking block's signature: clients send back only signed thinking (an empty signature
    reads as an interrupted stream), so one is given. Nothing checks it on the way back."""
    return "qwen3-mlx-" + hashlib.sha256(thinking.encode()).hexdigest()[:32]


def _delta(index: int, **delta: Any) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def _arguments(text: str) -> dict[str, Any]:
    """A call's input object; {} when the text is not one (a call cut at the token limit)."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}
