"""The chat and completion endpoints' work: queue a job, then stream or gather its answer.

Both shapes come from the same translator; a stream sends each delta as a chunk, a plain answer
merges them. A client that goes away cancels its job (the worker closes the Reply).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from sse_starlette.sse import EventSourceResponse

from qwen3_mlx.server.replies import ChatTranslator, StopScanner, merge_delta, usage_of
from qwen3_mlx.server.requests import ApiError, Prepared
from qwen3_mlx.server.worker import Failed, Finished, Job, Piece

if TYPE_CHECKING:  # types only: app.py imports this module
    from qwen3_mlx.server.app import ServerState

DISCONNECT_POLL_SECONDS = 0.5


def queue_job(state: ServerState, prepared: Prepared) -> tuple[Job, asyncio.Queue]:
    """Submit a job whose items arrive on an asyncio queue (ServerBusy when full)."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()

    def deliver(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    if prepared.speculative and state.worker.speculation is None:
        raise ApiError(
            "speculative: this server has no drafter (start it with --draft-model or --draft ngram)",
            param="speculative",
        )
    job = Job(
        prepared.prompt,
        prepared.sampling,
        deliver,
        tools=prepared.tools,
        top_logprobs=prepared.top_logprobs,
        schema=prepared.schema,
        json_answer=prepared.json_answer,
        speculative=prepared.speculative is not False,
    )
    state.worker.submit(job)
    return job, items


def failure(error: BaseException) -> ApiError:
    """The API error for a reply that failed in the worker."""
    if isinstance(error, ApiError):
        return error
    return ApiError(f"generation failed: {error}", status=500, kind="server_error")


def error_body(error: ApiError) -> dict[str, Any]:
    """OpenAI's error object."""
    return {
        "error": {
            "message": str(error),
            "type": error.kind,
            "param": error.param,
            "code": error.code,
        }
    }


async def next_item(items: asyncio.Queue, request: Request, job: Job, drain: Any) -> Any:
    """The next worker item; cancels the job when the client has gone, or with the drain's
    error once a stopping server's bound has passed."""
    while True:
        if drain.over:
            job.cancelled.set()
            return Failed(drain.error())
        try:
            return await asyncio.wait_for(items.get(), DISCONNECT_POLL_SECONDS)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                raise asyncio.CancelledError from None


class ChatRun:
    """One chat request: its id, its translator and its job."""

    def __init__(
        self,
        state: ServerState,
        prepared: Prepared,
        include_usage: bool,
        reasoning_field: str | None = None,  # None: the server's --reasoning-field
    ):
        self.state = state
        self.id = "chatcmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        field = reasoning_field or state.reasoning_field
        self.translator = ChatTranslator(state.tokenizer, field, prepared.stops)
        self.include_usage = include_usage
        self.error: ApiError | None = None  # why the reply failed, once it has
        self.job, self.items = queue_job(state, prepared)

    def chunk(self, delta: dict, logprobs: Any = None, finish: str | None = None) -> dict:
        """One chat.completion.chunk."""
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return self._envelope([choice], None)

    def _envelope(self, choices: list, usage: Any) -> dict:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.state.model_id,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage
        return body

    async def chunks(self, request: Request) -> AsyncIterator[dict]:
        """Every chunk of the stream, ending with finish_reason (and usage when asked)."""
        translator = self.translator
        yield self.chunk({"role": "assistant", "content": ""})
        while True:
            item = await next_item(self.items, request, self.job, self.state.drain)
            if isinstance(item, Failed):
                self.error = failure(item.error)
                yield error_body(self.error)
                return
            if isinstance(item, Piece):
                for delta, entries in translator.piece(item):
                    logprobs = (
                        translator.logprobs(entries) if self.job.top_logprobs is not None else None
                    )
                    yield self.chunk(delta, logprobs)
                if translator.stopped:
                    self.job.cancelled.set()
                continue
            deltas, reason, usage = translator.finish(item)
            for delta in deltas:
                yield self.chunk(delta)
            yield self.chunk({}, None, reason)
            if self.include_usage:
                yield self._envelope([], usage)
            return

    def stream(self, request: Request) -> EventSourceResponse:
        """The SSE response (keep-alive comments every ping interval, [DONE] at the end)."""

        async def events() -> AsyncIterator[dict]:
            try:
                async for chunk in self.chunks(request):
                    yield {"data": json.dumps(chunk, ensure_ascii=False)}
                yield {"data": "[DONE]"}
            finally:
                self.job.cancelled.set()  # a no-op after the end; stops a reply whose client left

        return EventSourceResponse(events(), ping=self.state.ping_seconds)

    async def gather(self, request: Request) -> dict:
        """The non-streamed chat.completion."""
        message: dict[str, Any] = {"role": "assistant", "content": ""}
        logprobs: list = []
        finish, usage = "stop", None
        try:
            async for chunk in self.chunks(request):
                if "error" in chunk:
                    assert self.error is not None
                    raise self.error
                for choice in chunk["choices"]:
                    merge_delta(message, choice["delta"])
                    if choice["logprobs"]:
                        logprobs += choice["logprobs"]["content"]
                    finish = choice["finish_reason"] or finish
                usage = chunk.get("usage") or usage
        finally:
            self.job.cancelled.set()
        if message.get("tool_calls") and not message["content"]:
            message["content"] = None
        choice = {
            "index": 0,
            "message": message,
            "logprobs": {"content": logprobs} if self.job.top_logprobs is not None else None,
            "finish_reason": finish,
        }
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.state.model_id,
            "choices": [choice],
            "usage": usage,
        }


class CompletionRun:
    """One /v1/completions request: the raw text the model writes after the prompt."""

    def __init__(self, state: ServerState, prepared: Prepared):
        self.state = state
        self.id = "cmpl-" + secrets.token_hex(12)
        self.created = int(time.time())
        self.stop = StopScanner(prepared.stops)
        self.job, self.items = queue_job(state, prepared)

    def chunk(self, text: str, finish: str | None = None, usage: Any = None) -> dict:
        """One text_completion object (a stream chunk or the whole answer)."""
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        body = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.state.model_id,
            "choices": [choice],
        }
        if usage is not None:
            body["usage"] = usage
        return body

    async def pieces(self, request: Request) -> AsyncIterator[tuple[str, str | None, Any]]:
        """(text, finish_reason, usage) as the reply goes; the last has the finish and usage."""
        while True:
            item = await next_item(self.items, request, self.job, self.state.drain)
            if isinstance(item, Failed):
                raise failure(item.error)
            if isinstance(item, Piece):
                text = self.stop.feed(getattr(item.event, "text", "") or "")
                if self.stop.hit:
                    self.job.cancelled.set()
                if text:
                    yield text, None, None
                continue
            assert isinstance(item, Finished)
            reason = "stop" if self.stop.hit or item.result.finish_reason == "stop" else "length"
            yield self.stop.flush(), reason, usage_of(item.result, item.cached_tokens)
            return

    def stream(self, request: Request, include_usage: bool) -> EventSourceResponse:
        """The SSE response."""

        async def events() -> AsyncIterator[dict]:
            try:
                async for text, reason, usage in self.pieces(request):
                    body = self.chunk(text, reason, usage if include_usage else None)
                    yield {"data": json.dumps(body, ensure_ascii=False)}
                yield {"data": "[DONE]"}
            except ApiError as error:  # the stream has begun: its last event says why it ended
                yield {"data": json.dumps(error_body(error), ensure_ascii=False)}
            finally:
                self.job.cancelled.set()

        return EventSourceResponse(events(), ping=self.state.ping_seconds)

    async def gather(self, request: Request) -> dict:
        """The whole text_completion."""
        parts, reason, usage = [], "stop", None
        try:
            async for text, finish, last_usage in self.pieces(request):
                parts.append(text)
                reason, usage = finish or reason, last_usage or usage
        finally:
            self.job.cancelled.set()
        return self.chunk("".join(parts), reason, usage)
