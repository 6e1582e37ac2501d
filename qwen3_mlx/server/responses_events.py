"""From a turn's deltas to the Responses API's output items and streamed events.

A stream and a plain answer come from the same builder: the plain answer is the response the
stream's last event carries, so the two cannot disagree.
"""

from __future__ import annotations

import secrets
from typing import Any

from qwen3_mlx.server.turns import Delta, TurnEnd

# Clients that keep no state (store: false, include ["reasoning.encrypted_content"]; Codex does
# this) send reasoning back as encrypted_content. This server's "encryption" is its plain text
# behind this mark, so the next prompt renders the think block as the model wrote it.
SEALED = "qwen3-mlx-reasoning:"


def item_id(prefix: str) -> str:
    """A fresh output-item id (msg_, rs_, fc_, resp_)."""
    return f"{prefix}_{secrets.token_hex(12)}"


def responses_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """The Responses usage object from chat usage."""
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            "cache_write_tokens": 0,
        },
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {
            "reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"]
        },
        "total_tokens": usage["total_tokens"],
    }


class ResponseBuilder:
    """Output items and events of one response, item by item as the deltas arrive."""

    def __init__(self, response: dict[str, Any], sealed: bool = False):
        self.response = response  # every field but output, status and usage
        self.sealed = sealed  # reasoning items carry their text in encrypted_content too
        self.output: list[dict[str, Any]] = []
        self.sequence = 0
        self.open: dict[str, Any] | None = None  # the item being written
        self.calls: dict[int, dict[str, Any]] = {}
        self.final: dict[str, Any] | None = None  # the finished response

    def snapshot(self, status: str, **fields: Any) -> dict[str, Any]:
        """The response object as it stands."""
        return {**self.response, "status": status, "output": list(self.output), **fields}

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """One numbered event (response.KIND; the error event is plain `error`)."""
        self.sequence += 1
        name = kind if kind == "error" else f"response.{kind}"
        return {"type": name, "sequence_number": self.sequence - 1, **fields}

    def start(self) -> list[dict[str, Any]]:
        """response.created and response.in_progress."""
        response = self.snapshot("in_progress", usage=None)
        return [
            self.event("created", response=response),
            self.event("in_progress", response=response),
        ]

    def feed(self, delta: Delta) -> list[dict[str, Any]]:
        """The events of one delta (a new item is opened when the kind changes)."""
        if delta.kind == "arguments":
            call = self.calls[delta.call]
            call["arguments"] += delta.text
            where = self._where(call)
            return [self.event("function_call_arguments.delta", delta=delta.text, **where)]
        events: list[dict[str, Any]] = []
        kind = {"reasoning": "reasoning", "text": "message", "call": "function_call"}[delta.kind]
        if delta.kind == "call" or self.open is None or self.open["type"] != kind:
            events += self._close("completed")
            events += self._open(kind, delta)
        item = self.open
        assert item is not None
        if delta.kind == "reasoning":
            item["content"][0]["text"] += delta.text
            events.append(self.event("reasoning_text.delta", delta=delta.text, **self._part(item)))
        elif delta.kind == "text":
            item["content"][0]["text"] += delta.text
            events.append(
                self.event("output_text.delta", delta=delta.text, logprobs=[], **self._part(item))
            )
        return events

    def finish(self, end: TurnEnd) -> list[dict[str, Any]]:
        """The last events, ending with response.completed (or .incomplete at the token limit)."""
        cut = end.finish_reason == "length"
        events = self._close("incomplete" if cut else "completed")
        usage = responses_usage(end.usage)
        if cut:
            details = {"reason": "max_output_tokens"}
            self.final = self.snapshot("incomplete", usage=usage, incomplete_details=details)
            return [*events, self.event("incomplete", response=self.final)]
        self.final = self.snapshot("completed", usage=usage)
        return [*events, self.event("completed", response=self.final)]

    def fail(self, code: str, message: str) -> list[dict[str, Any]]:
        """An error event and response.failed."""
        error = {"code": code, "message": message}
        failed = self.snapshot("failed", usage=None, error=error)
        return [
            self.event("error", code=code, message=message, param=None),
            self.event("failed", response=failed),
        ]

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.output.index(item)}

    def _part(self, item: dict[str, Any]) -> dict[str, Any]:
        return {**self._where(item), "content_index": 0}

    def _open(self, kind: str, delta: Delta) -> list[dict[str, Any]]:
        if kind == "function_call":
            item = {
                "type": "function_call",
                "id": item_id("fc"),
                "call_id": delta.call_id,
                "name": delta.name,
                "arguments": "",
                "status": "in_progress",
            }
            self.calls[delta.call] = item
        elif kind == "reasoning":
            item = {"type": "reasoning", "id": item_id("rs"), "summary": [], "content": []}
            item["status"] = "in_progress"
        else:
            item = {"type": "message", "id": item_id("msg"), "role": "assistant", "content": []}
            item["status"] = "in_progress"
        self.output.append(item)
        self.open = item
        events = [self.event("output_item.added", item=_copy(item), **self._where(item))]
        if kind != "function_call":
            part = _empty_part(kind)
            item["content"].append(part)
            events.append(self.event("content_part.added", part=dict(part), **self._part(item)))
        return events

    def _close(self, status: str) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = status
        if item["type"] == "reasoning" and self.sealed:
            item["encrypted_content"] = SEALED + item["content"][0]["text"]
        events = []
        if item["type"] == "function_call":
            done = {"arguments": item["arguments"], "name": item["name"], **self._where(item)}
            events.append(self.event("function_call_arguments.done", **done))
        else:
            part = item["content"][0]
            kind = "reasoning_text" if item["type"] == "reasoning" else "output_text"
            extra = {} if kind == "reasoning_text" else {"logprobs": []}
            events.append(
                self.event(f"{kind}.done", text=part["text"], **extra, **self._part(item))
            )
            events.append(self.event("content_part.done", part=dict(part), **self._part(item)))
        events.append(self.event("output_item.done", item=_copy(item), **self._where(item)))
        return events


def _empty_part(kind: str) -> dict[str, Any]:
    if kind == "reasoning":
        return {"type": "reasoning_text", "text": ""}
    return {"type": "output_text", "text": "", "annotations": [], "logprobs": []}


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    copy = dict(item)
    if "content" in copy:
        copy["content"] = [dict(part) for part in copy["content"]]
    return copy
