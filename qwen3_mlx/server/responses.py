"""POST /v1/responses: OpenAI's Responses API, as one more view of the chat engine.

A request becomes the chat request it means (instructions as the system message, input items as
messages, reasoning items as the assistant's reasoning_content), so it renders the same prompt,
runs on the same worker and reuses the same prefix cache as /v1/chat/completions. Responses are
kept in a bounded in-memory store for `previous_response_id` and GET /v1/responses/{id}.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter
from sse_starlette.sse import EventSourceResponse

from qwen3_mlx.server import responses_protocol as rp
from qwen3_mlx.server.requests import ApiError
from qwen3_mlx.server.responses_events import SEALED, ResponseBuilder, item_id
from qwen3_mlx.server.turns import TurnEnd, chat_request, start_turn, turn_deltas
from qwen3_mlx.settings import SETTINGS

if TYPE_CHECKING:  # types only: app.py imports this module
    from qwen3_mlx.server.app import ServerState

STORED_RESPONSES = 256  # the newest responses kept for previous_response_id (and GET)
INPUT_ITEM: TypeAdapter[Any] = TypeAdapter(rp.InputItem)
PARAMS = {  # chat request fields by the Responses names a client knows them by
    "messages": "input",
    "max_tokens": "max_output_tokens",
    "response_format": "text",
    "reasoning_effort": "reasoning",
}


class ResponseStore:
    """The newest responses, each with the conversation items that led to it and its output."""

    def __init__(self, limit: int = STORED_RESPONSES):
        self.limit = limit
        self.entries: OrderedDict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = OrderedDict()

    def put(self, response: dict[str, Any], items: list[dict[str, Any]]) -> None:
        """Keep a finished response; the oldest goes when the store is full."""
        self.entries[response["id"]] = (items + response["output"], response)
        self.entries.move_to_end(response["id"])
        while len(self.entries) > self.limit:
            self.entries.popitem(last=False)

    def conversation(self, response_id: str) -> list[dict[str, Any]]:
        """The items of a stored response's conversation, its output included."""
        return list(self._get(response_id, "previous_response_id")[0])

    def response(self, response_id: str) -> dict[str, Any]:
        """A stored response object."""
        return self._get(response_id, "response_id")[1]

    def delete(self, response_id: str) -> None:
        """Forget a stored response."""
        self._get(response_id, "response_id")
        del self.entries[response_id]

    def _get(self, response_id: str, param: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if response_id not in self.entries:
            raise ApiError(
                f"no stored response with id {response_id!r}: this server keeps the newest "
                f"{self.limit} responses, in memory, until it restarts",
                status=404,
                param=param,
                code="previous_response_not_found",
            )
        self.entries.move_to_end(response_id)
        return self.entries[response_id]


def conversation_messages(items: list[Any], instructions: str | None) -> list[dict[str, Any]]:
    """Chat messages for input items: calls join the assistant message before them, a reasoning
    item becomes the next assistant message's reasoning_content."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    reasoning: str | None = None
    for index, item in enumerate(items):
        if item.type == "reasoning":
            reasoning = _reasoning_text(item)
            continue
        if item.type == "function_call_output":
            text = _text(item.output, f"input.{index}.output")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": text})
            continue
        if item.type == "message" and item.role != "assistant":
            messages.append({"role": item.role, "content": _text(item.content, f"input.{index}")})
            continue
        last = messages[-1] if messages else {}
        if item.type == "message" or last.get("role") != "assistant" or reasoning is not None:
            last = {"role": "assistant", "content": ""}
            if reasoning is not None:
                last["reasoning_content"], reasoning = reasoning, None
            messages.append(last)
        if item.type == "message":
            last["content"] = _text(item.content, f"input.{index}")
        else:
            call = {"name": item.name, "arguments": item.arguments}
            last.setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function", "function": call}
            )
    return messages


def _reasoning_text(item: rp.ReasoningItem) -> str | None:
    """The think block's text: the item's content, else the text this server put in
    encrypted_content (another server's encrypted reasoning cannot be read, and is left out)."""
    if item.content:
        return "".join(part.text for part in item.content)
    sealed = item.encrypted_content or ""
    return sealed.removeprefix(SEALED) if sealed.startswith(SEALED) else None


def _text(content: str | list[rp.ContentPart], param: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type not in ("input_text", "output_text", "text", "refusal"):
            raise ApiError(f"{param}: content of type {part.type!r} is not supported (text only)")
        texts.append(part.text or getattr(part, "refusal", None) or "")
    return "".join(texts)


def chat_fields(body: rp.ResponseRequest, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat request's fields for a Responses request."""
    tools = []
    for index, tool in enumerate(body.tools or []):
        if not isinstance(tool, rp.FunctionTool):
            raise ApiError(
                f"tools.{index}: only function tools are supported, not {tool.type!r}",
                param="tools",
            )
        function = tool.model_dump(exclude_none=True, exclude={"type", "strict"})
        tools.append({"type": "function", "function": function})
    choice: Any = body.tool_choice
    if isinstance(choice, rp.FunctionChoice):
        choice = {"type": "function", "function": {"name": choice.name}}
    elif isinstance(choice, dict):
        raise ApiError(
            "tool_choice must be none, auto, required or {type: function, name}",
            param="tool_choice",
        )
    fields = {name: getattr(body, name) for name in SETTINGS if name != "max_tokens"}
    fields["chat_template_kwargs"] = body.chat_template_kwargs
    fields |= {"messages": messages, "tools": tools or None, "tool_choice": choice}
    fields |= {
        "parallel_tool_calls": body.parallel_tool_calls,
        "enable_thinking": body.enable_thinking,
        "speculative": body.speculative,
    }
    fields["max_tokens"] = body.max_output_tokens
    if body.reasoning is not None:
        fields["reasoning_effort"] = body.reasoning.effort
    text_format = body.text.format if body.text else None
    if text_format is not None and text_format.type != "text":
        fields["response_format"] = {"type": text_format.type}
        if text_format.type == "json_schema":
            schema = text_format.model_dump(by_alias=True, exclude={"type"}, exclude_none=True)
            fields["response_format"]["json_schema"] = schema
    return fields


def response_fields(state: ServerState, body: rp.ResponseRequest) -> dict[str, Any]:
    """The fields a response echoes from its request."""
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    choice = body.tool_choice
    if isinstance(choice, rp.FunctionChoice):
        choice = choice.model_dump()
    return {
        "id": item_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "model": state.model_id,
        "instructions": body.instructions,
        "previous_response_id": body.previous_response_id,
        "tools": tools,
        "tool_choice": choice or "auto",
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "store": body.store is not False,
        "metadata": body.metadata,
        "incomplete_details": None,
        "error": None,
    }


def add_responses_routes(app: FastAPI, state: ServerState, responses: dict[int, Any]) -> None:
    """POST /v1/responses, GET and DELETE /v1/responses/{id}."""
    store = ResponseStore()

    @app.post("/v1/responses", response_model=rp.ResponseObject, responses=responses)
    async def create_response(body: rp.ResponseRequest, request: Request) -> Any:
        """A model response, streamed (SSE events) or not; tool calls come back as items."""
        items = body.input
        if isinstance(items, str):
            items = [rp.MessageItem(role="user", content=items)]
        history = store.conversation(body.previous_response_id) if body.previous_response_id else []
        conversation = history + [item.model_dump(exclude_none=True) for item in items]
        parsed = [INPUT_ITEM.validate_python(item) for item in conversation]
        messages = conversation_messages(parsed, body.instructions)
        run = start_turn(state, chat_request(chat_fields(body, messages), PARAMS), PARAMS)
        sealed = "reasoning.encrypted_content" in (body.include or [])
        builder = ResponseBuilder(response_fields(state, body), sealed)
        keep = conversation if body.store is not False else None

        async def events() -> AsyncIterator[dict[str, Any]]:
            for event in builder.start():
                yield event
            try:
                async for delta in turn_deltas(run, request):
                    if isinstance(delta, TurnEnd):
                        out = builder.finish(delta)
                        if keep is not None and builder.final is not None:
                            store.put(builder.final, keep)  # before the client can refer to it
                    else:
                        out = builder.feed(delta)
                    for event in out:
                        yield event
            except ApiError as error:
                for event in builder.fail(error.code or "server_error", str(error)):
                    yield event
            finally:
                run.job.cancelled.set()  # a no-op after the end; stops a reply whose client left

        if body.stream:
            return EventSourceResponse(
                (
                    {"event": event["type"], "data": json.dumps(event, ensure_ascii=False)}
                    async for event in events()
                ),
                ping=state.ping_seconds,
            )
        last: dict[str, Any] = {}
        async for event in events():
            last = event
        if last["type"] == "response.failed":
            error = last["response"]["error"]
            raise ApiError(error["message"], status=500, kind="server_error", code=error["code"])
        return JSONResponse(last["response"])

    @app.get("/v1/responses/{response_id}", response_model=rp.ResponseObject, responses=responses)
    async def get_response(response_id: str) -> Any:
        """A stored response."""
        return JSONResponse(store.response(response_id))

    @app.delete(
        "/v1/responses/{response_id}", response_model=rp.DeletedResponse, responses=responses
    )
    async def delete_response(response_id: str) -> Any:
        """Forget a stored response."""
        store.delete(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}
