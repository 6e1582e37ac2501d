"""From Reply events to OpenAI deltas: reasoning, content (stop strings applied), tool-call deltas.

Streaming and non-streaming answers come from the same deltas: a non-streamed message is the sum
of what a stream would have sent, so the two cannot disagree.
"""

from __future__ import annotations

import json
import re
from typing import Any

from qwen3_mlx.events import AnswerText, ThinkingText, ToolCallEvent, ToolCallText
from qwen3_mlx.server.worker import Finished, Piece, TokenLogprob
from qwen3_mlx.tools import ToolCall, new_call_id

# The start of a call body up to its argument value, as Qwen3 writes it.
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)')
FINISH = {"stop": "stop", "tool_calls": "tool_calls", "length": "length", "repetition": "length"}


class StopScanner:
    """Cut the answer at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.held = ""
        self.hit = False
        self.matched: str | None = None  # the stop string that ended the answer

    def feed(self, text: str) -> str:
        """The text that can be sent now."""
        if self.hit:
            return ""
        text = self.held + text
        cuts = sorted((text.find(stop), stop) for stop in self.stops if stop in text)
        if cuts:
            (cut, self.matched), self.hit, self.held = cuts[0], True, ""
            return text[:cut]
        keep = max((_partial(text, stop) for stop in self.stops), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """What was held back, once the answer has ended."""
        held, self.held = self.held, ""
        return "" if self.hit else held


def _partial(text: str, stop: str) -> int:
    for length in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:length]):
            return length
    return 0


class CallStreamer:
    """One tool call's deltas: id, type and name once, then the argument text in fragments.

    Trailing `}` and whitespace are held back until the call ends, since the last of them closes
    the call object rather than the arguments; the end sends exactly the rest of the arguments.
    """

    def __init__(self, index: int):
        self.index = index
        self.id = new_call_id()
        self.text = ""
        self.start: int | None = None  # where the argument text begins in self.text
        self.sent = 0  # argument characters sent

    def feed(self, piece: str) -> list[dict[str, Any]]:
        """Deltas for one more piece of the call body."""
        self.text += piece
        deltas = []
        if self.start is None:
            head = CALL_HEAD.match(self.text)
            if head is None:
                return []
            self.start = head.end()
            name = json.loads(head.group(1))
            deltas.append(self._delta(id=self.id, type="function", name=name, arguments=""))
        arguments = self.text[self.start :]
        ready = len(arguments.rstrip("} \n\t\r"))
        if ready > self.sent:
            deltas.append(self._delta(arguments=arguments[self.sent : ready]))
            self.sent = ready
        return deltas

    def finish(self, call: ToolCall) -> tuple[list[dict[str, Any]], str]:
        """The last deltas of a finished call, and text for the content when it was invalid."""
        if call.valid and self.start is None:
            head = self._delta(id=self.id, type="function", name=call.name, arguments="")
            self.start = 0
            rest = self._delta(arguments=call.arguments_text)
            return [head, rest], ""
        if call.valid:
            rest = call.arguments_text[self.sent :]
            return ([self._delta(arguments=rest)] if rest else []), ""
        if self.start is None:  # nothing of it was sent: it goes back as the text it was
            return [], f"<tool_call>\n{call.arguments_text}\n</tool_call>"
        return [], ""

    def _delta(self, **fields: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"index": self.index}
        function = {k: fields.pop(k) for k in ("name", "arguments") if k in fields}
        entry.update(fields)
        entry["function"] = function
        return {"tool_calls": [entry]}


class ChatTranslator:
    """Turns one reply's worker items into chat deltas and, at the end, its finish and usage."""

    def __init__(self, tokenizer: Any, reasoning_field: str, stops: list[str]):
        self.tokenizer = tokenizer
        self.fields = (
            ["reasoning_content", "reasoning"] if reasoning_field == "both" else [reasoning_field]
        )
        self.inline = InlineThinking() if reasoning_field == "content" else None
        self.stop = StopScanner(stops)
        self.calls: dict[int, CallStreamer] = {}
        self.emitted_calls = 0
        self.valid_calls = 0

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended the answer (the reply should be closed)."""
        return self.stop.hit

    def piece(self, piece: Piece) -> list[tuple[dict[str, Any], list[TokenLogprob]]]:
        """(delta, logprobs) pairs for one event."""
        event = piece.event
        if self.inline is not None:
            text = self.inline.text(event)
            if isinstance(event, ThinkingText):
                return [({"content": text}, [])]
            if text:
                return [({"content": text}, []), *self._piece(piece)]
        return self._piece(piece)

    def _piece(self, piece: Piece) -> list[tuple[dict[str, Any], list[TokenLogprob]]]:
        event = piece.event
        if isinstance(event, ThinkingText):
            return [({name: event.text for name in self.fields}, [])]
        if isinstance(event, AnswerText):
            text = self.stop.feed(event.text)
            return [({"content": text}, piece.logprobs)] if text else []
        if isinstance(event, ToolCallText):
            return [(delta, []) for delta in self._streamer(event.index).feed(event.text)]
        if isinstance(event, ToolCallEvent):
            deltas, text = self._streamer(event.index).finish(event.call)
            if event.call.valid:
                self.valid_calls += 1
            out = [(delta, []) for delta in deltas]
            return out + ([({"content": text}, [])] if text else [])
        return []

    def _streamer(self, index: int) -> CallStreamer:
        if index not in self.calls:
            self.calls[index] = CallStreamer(self.emitted_calls)
            self.emitted_calls += 1
        return self.calls[index]

    def finish(self, finished: Finished) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
        """The last deltas (held-back text), the finish_reason and the usage."""
        deltas = []
        result = finished.result
        if self.inline is not None and self.inline.opened and not self.inline.closed:
            if result.thinking_finished:  # the reply ended right after its think block
                deltas.append({"content": self.inline.close()})
        held = self.stop.flush()
        if held:
            deltas.append({"content": held})
        if self.stop.hit:
            reason = "stop"
        else:
            reason = FINISH.get(result.finish_reason, "stop")
        if reason == "tool_calls" and not self.valid_calls:
            reason = "stop"
        usage = usage_of(result, finished.cached_tokens)
        return deltas, reason, usage

    def logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """OpenAI's chat logprobs object for some answer tokens."""
        return {"content": [self._entry(entry) for entry in entries]}

    def _entry(self, entry: TokenLogprob) -> dict[str, Any]:
        return {
            **self._token(entry.token, entry.logprob),
            "top_logprobs": [self._token(token, value) for token, value in entry.top],
        }

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.tokenizer.decode([token])
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}


class InlineThinking:
    """The think block left in the content (--reasoning-field content), its markers written back
    the way the template renders a reasoning turn: `<think>\\n…\\n</think>\\n\\n` before the answer."""

    def __init__(self) -> None:
        self.opened = False
        self.closed = False

    def text(self, event: Any) -> str:
        """The content text for a thinking event, or the markers due before any other event."""
        if isinstance(event, ThinkingText):
            opening = "" if self.opened else "<think>\n"
            self.opened = True
            return opening + event.text
        return self.close() if self.opened and not self.closed else ""

    def close(self) -> str:
        """The end of the think block."""
        self.closed = True
        return "\n</think>\n\n"


def usage_of(result: Any, cached_tokens: int) -> dict[str, Any]:
    """The usage object of a finished reply."""
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.generated_tokens,
        "total_tokens": result.prompt_tokens + result.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {
            "reasoning_tokens": result.thinking_tokens,
            # OpenAI's names for speculative decoding (predicted outputs): drafted tokens the
            # model accepted, and those it rejected.
            "accepted_prediction_tokens": result.accepted_tokens,
            "rejected_prediction_tokens": result.drafted_tokens - result.accepted_tokens,
        },
    }


def merge_delta(message: dict[str, Any], delta: dict[str, Any]) -> None:
    """Add one delta to a non-streamed message."""
    for key, value in delta.items():
        if key == "tool_calls":
            calls = message.setdefault("tool_calls", [])
            for entry in value:
                if entry["index"] == len(calls):
                    calls.append(
                        {"id": entry["id"], "type": "function", "function": dict(entry["function"])}
                    )
                else:
                    calls[entry["index"]]["function"]["arguments"] += entry["function"]["arguments"]
        elif key != "role":
            message[key] = (message.get(key) or "") + value
