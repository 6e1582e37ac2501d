"""One chat turn as typed deltas, for the APIs that are not chat completions.

The Responses and Anthropic Messages routes translate their request into a ChatCompletionRequest,
start it exactly as /v1/chat/completions does (same prompt, worker, engine and prefix cache), and
translate these deltas, which are the chat stream's own, into their event shapes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Request
from pydantic import ValidationError

from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.server.generation import ChatRun
from qwen3_mlx.server.protocol import ChatCompletionRequest
from qwen3_mlx.server.requests import ApiError, Prepared, api_error, prepare_chat

if TYPE_CHECKING:  # types only: app.py imports this module
    from qwen3_mlx.server.app import ServerState


@dataclass(frozen=True)
class Delta:
    """A piece of the turn: reasoning or answer text, the start of a call, or argument text."""

    kind: Literal["reasoning", "text", "call", "arguments"]
    text: str = ""
    call: int = 0  # the call's index among this turn's calls
    call_id: str = ""
    name: str = ""


@dataclass(frozen=True)
class TurnEnd:
    """How the turn ended: stop, length or tool_calls; chat usage; the stop string that hit."""

    finish_reason: str
    usage: dict[str, Any]
    stop_sequence: str | None


def chat_request(fields: dict[str, Any], param_of: dict[str, str]) -> Any:
    """A ChatCompletionRequest from translated fields; a field it refuses is a 400 that names the
    client's field (`param_of` maps chat names to the API's own)."""
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = [str(part) for part in first["loc"]]
        param = param_of.get(where[0], ".".join(where)) if where else None
        raise ApiError(f"{param or 'body'}: {first['msg']}", param=param) from None


def prepare_turn(
    state: ServerState, request: ChatCompletionRequest, param_of: dict[str, str]
) -> Prepared:
    """prepare_chat, its refusals naming the client's fields."""
    try:
        return prepare_chat(state, request)
    except Qwen3Error as error:
        refusal = api_error(error)
        refusal.param = param_of.get(refusal.param or "", refusal.param)
        raise refusal from None


def start_turn(
    state: ServerState, request: ChatCompletionRequest, param_of: dict[str, str]
) -> ChatRun:
    """Prepare and queue a chat request (its errors are raised here, before any answer)."""
    prepared = prepare_turn(state, request, param_of)
    return ChatRun(state, prepared, include_usage=True, reasoning_field="reasoning_content")


async def turn_deltas(run: ChatRun, request: Request) -> AsyncIterator[Delta | TurnEnd]:
    """The turn's deltas, then its end; a failed reply raises ApiError."""
    finish, usage = "stop", None
    try:
        async for chunk in run.chunks(request):
            if "error" in chunk:
                error = chunk["error"]
                raise ApiError(error["message"], status=500, kind=error["type"], code=error["code"])
            for choice in chunk["choices"]:
                for delta in _deltas(choice["delta"]):
                    yield delta
                finish = choice["finish_reason"] or finish
            usage = chunk.get("usage") or usage
    finally:
        run.job.cancelled.set()  # a no-op after the end; stops a reply whose client left
    assert usage is not None
    yield TurnEnd(finish, usage, run.translator.stop.matched)


def _deltas(delta: dict[str, Any]) -> list[Delta]:
    out = []
    if delta.get("reasoning_content"):
        out.append(Delta("reasoning", delta["reasoning_content"]))
    if delta.get("content"):
        out.append(Delta("text", delta["content"]))
    for entry in delta.get("tool_calls") or []:
        function = entry["function"]
        if "id" in entry:
            out.append(
                Delta("call", call=entry["index"], call_id=entry["id"], name=function["name"])
            )
        if function.get("arguments"):
            out.append(Delta("arguments", function["arguments"], call=entry["index"]))
    return out
