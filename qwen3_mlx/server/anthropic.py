"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the chat engine.

A request becomes the chat request it means (system as the system message, tool_result blocks as
tool messages, thinking blocks as the assistant's reasoning_content, tool_use input written as the
template writes arguments), so it renders the same prompt, runs on the same worker and reuses the
same prefix cache as /v1/chat/completions. Errors on these routes answer in Anthropic's shape.
"""

from __future__ import annotations

import inspect
import json
import secrets
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from qwen3_mlx.server import anthropic_protocol as ap
from qwen3_mlx.server.anthropic_events import MessageBuilder, error_body
from qwen3_mlx.server.requests import ApiError
from qwen3_mlx.server.turns import TurnEnd, chat_request, prepare_turn, start_turn, turn_deltas

if TYPE_CHECKING:  # types only: app.py imports this module
    from qwen3_mlx.server.app import ServerState

PREFIX = "/v1/messages"
PARAMS = {  # chat request fields by the Anthropic names a client knows them by
    "stop": "stop_sequences",
    "response_format": "output_config",
    "enable_thinking": "thinking",
}
ERRORS = {code: {"model": ap.ErrorResponse} for code in (400, 401, 404, 413, 422, 500, 503)}
STREAMED = {200: {"content": {"text/event-stream": {"schema": {"type": "object"}}}}, **ERRORS}


def anthropic_error(response: Response) -> JSONResponse:
    """An OpenAI-shaped error response, reshaped as Anthropic's (same status)."""
    body = json.loads(bytes(response.body))
    message = body.get("error", {}).get("message", "error")
    return JSONResponse(error_body(response.status_code, message), status_code=response.status_code)


class AnthropicRoute(APIRoute):
    """A route whose errors go through the app's handlers and come out in Anthropic's shape."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        """The handler, wrapped."""
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as error:
                found = _handler_for(request.app.exception_handlers, error)
                if found is None:
                    raise
                if inspect.iscoroutinefunction(found):
                    response = await found(request, error)
                else:
                    response = await run_in_threadpool(found, request, error)
                return anthropic_error(response)

        return route


def _handler_for(handlers: dict[Any, Any], error: Exception) -> Any:
    for kind in type(error).__mro__:
        if kind in handlers:
            return handlers[kind]
    return None


def conversation_messages(body: ap.CountTokensRequest) -> list[dict[str, Any]]:
    """Chat messages for the system prompt and the turns."""
    messages: list[dict[str, Any]] = []
    system = body.system
    if isinstance(system, list):
        system = "".join(block.text for block in system)
    if system:
        messages.append({"role": "system", "content": system})
    for index, turn in enumerate(body.messages):
        if isinstance(turn.content, str):
            messages.append({"role": turn.role, "content": turn.content})
        elif turn.role == "user":
            messages += _user_turn(turn.content, index)
        else:
            messages.append(_assistant_turn(turn.content, index))
    if body.messages[-1].role == "assistant":
        raise ApiError(
            "the last message must be the user's: continuing a written assistant turn "
            "(prefill) is not supported",
            param="messages",
        )
    return messages


def _user_turn(blocks: list[Any], index: int) -> list[dict[str, Any]]:
    results, texts = [], []
    for block in blocks:
        if block.type == "tool_result":
            content = _text(block.content or "", f"messages.{index}.content")
            results.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
        elif block.type == "text":
            texts.append(block.text)
        elif block.type in ("image", "document"):
            raise ApiError(
                f"messages.{index}.content: {block.type} blocks are not supported (text only)",
                param="messages",
            )
    return results + ([{"role": "user", "content": "".join(texts)}] if texts else [])


def _assistant_turn(blocks: list[Any], index: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": ""}
    for block in blocks:
        if block.type == "thinking":
            message["reasoning_content"] = message.get("reasoning_content", "") + block.thinking
        elif block.type == "text":
            message["content"] += block.text
        elif block.type == "tool_use":
            # As the template's tojson writes an argument object, and as the model wrote it.
            arguments = json.dumps(block.input, ensure_ascii=False)
            call = {"id": block.id, "type": "function"}
            call["function"] = {"name": block.name, "arguments": arguments}
            message.setdefault("tool_calls", []).append(call)
        elif block.type in ("image", "document", "tool_result"):
            raise ApiError(
                f"messages.{index}.content: an assistant turn cannot hold {block.type} blocks",
                param="messages",
            )
    return message


def _text(content: str | list[Any], param: str) -> str:
    if isinstance(content, str):
        return content
    if any(block.type != "text" for block in content):
        raise ApiError(f"{param}: tool results can hold text only", param="messages")
    return "".join(block.text for block in content)


def chat_fields(body: ap.CountTokensRequest) -> dict[str, Any]:
    """The chat request's fields for a Messages (or count_tokens) request."""
    tools = []
    for index, tool in enumerate(body.tools or []):
        if tool.type not in (None, "custom"):
            raise ApiError(
                f"tools.{index}: only client tools (name, input_schema) are supported, "
                f"not the server tool {tool.type!r}",
                param="tools",
            )
        function = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description is not None:
            function["description"] = tool.description
        tools.append({"type": "function", "function": function})
    fields: dict[str, Any] = {"messages": conversation_messages(body), "tools": tools or None}
    choice = body.tool_choice
    if choice is not None:
        if choice.type == "tool":
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name or ""}}
        else:
            fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
        if choice.disable_parallel_tool_use:
            fields["parallel_tool_calls"] = False
    if body.thinking is not None:
        fields["enable_thinking"] = body.thinking.type != "disabled"
    if isinstance(body, ap.MessagesRequest):
        fields |= {"max_tokens": body.max_tokens, "stop": body.stop_sequences}
        fields |= {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k}
        fields["speculative"] = body.speculative
        output_format = body.output_config.format if body.output_config else None
        if output_format is not None:
            schema = {"name": "output", "schema": output_format.json_schema}
            fields["response_format"] = {"type": "json_schema", "json_schema": schema}
    return fields


def add_anthropic_routes(app: FastAPI, state: ServerState) -> None:
    """POST /v1/messages and /v1/messages/count_tokens."""
    router = APIRouter(route_class=AnthropicRoute)

    @router.post(PREFIX, response_model=ap.MessageResponse, responses=STREAMED)
    async def messages(body: ap.MessagesRequest, request: Request) -> Any:
        """A message, streamed (SSE events) or not; calls come back as tool_use blocks."""
        run = start_turn(state, chat_request(chat_fields(body), PARAMS), PARAMS)
        message_id = "msg_" + secrets.token_hex(12)
        builder = MessageBuilder(message_id, state.model_id, len(run.job.prompt))

        async def events() -> AsyncIterator[dict[str, Any]]:
            for event in builder.start():
                yield event
            try:
                async for delta in turn_deltas(run, request):
                    done = isinstance(delta, TurnEnd)
                    for event in builder.finish(delta) if done else builder.feed(delta):
                        yield event
            finally:
                run.job.cancelled.set()  # a no-op after the end; stops a reply whose client left

        if body.stream:
            return EventSourceResponse(_sse(events()), ping=state.ping_seconds)
        async for _event in events():
            pass
        return JSONResponse(builder.message)

    @router.post(f"{PREFIX}/count_tokens", response_model=ap.TokenCount, responses=ERRORS)
    async def count_tokens(body: ap.CountTokensRequest) -> Any:
        """How many tokens the prompt for these messages, system and tools has."""
        prepared = prepare_turn(state, chat_request(chat_fields(body), PARAMS), PARAMS)
        return {"input_tokens": len(prepared.prompt)}

    app.include_router(router)


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, str]]:
    """Named SSE events; a reply that fails mid-stream ends with an error event."""
    try:
        async for event in events:
            yield {"event": event["type"], "data": json.dumps(event, ensure_ascii=False)}
    except ApiError as error:
        yield {"event": "error", "data": json.dumps(error_body(error.status, str(error)))}
