"""The FastAPI app: thin routes over the request preparation, the worker and the translators."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen3_mlx.engine import check_context
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.limits import min_tokens
from qwen3_mlx.server import protocol as p
from qwen3_mlx.server.anthropic import add_anthropic_routes
from qwen3_mlx.server.generation import ChatRun, CompletionRun, error_body
from qwen3_mlx.server.grammars import GrammarCache
from qwen3_mlx.server.guard import Guard, check_size
from qwen3_mlx.server.metrics import Metrics
from qwen3_mlx.server.processors import ResponseFormatError
from qwen3_mlx.server.requests import (
    ApiError,
    Prepared,
    api_error,
    chat_messages,
    overflow_message,
    prepare_chat,
    request_settings,
    requested_thinking,
    stop_strings,
)
from qwen3_mlx.server.responses import add_responses_routes
from qwen3_mlx.server.shutdown import Drain
from qwen3_mlx.server.worker import GenerationWorker, ServerBusy
from qwen3_mlx.settings import Sampling

ERRORS = {code: {"model": p.ErrorResponse} for code in (400, 401, 404, 413, 422, 500, 503)}
# One server-sent event, as OpenAPI 3.2 describes a stream's items: `data` holds a JSON chunk (or
# [DONE]); schemathesis checks each event of a streamed answer against this.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}
STREAMED = {
    200: {"content": {"text/event-stream": {"schema": SSE_EVENT}}},
    **ERRORS,
}
# A request's reasoning_format (llama.cpp's names) -> where the reasoning goes; None: the server's.
REASONING_FORMATS = {"none": "content", "deepseek": "reasoning_content", "auto": None}


@dataclass
class ServerState:
    """What every route reads: the model, its tokenizer, the worker and the server's options."""

    model: Any
    tokenizer: Any
    generation_config: Any
    model_id: str
    context_limit: int
    worker: GenerationWorker
    metrics: Metrics
    reasoning_field: str = "reasoning_content"
    api_key: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # sampling flags of the command
    ping_seconds: float = 10.0
    max_body_bytes: int = 64 << 20
    facts: dict[str, Any] = field(default_factory=dict)
    grammars: GrammarCache = field(default_factory=GrammarCache)
    allowed_hosts: frozenset[str] | None = None  # Host names answered (None: any)
    drain: Drain = field(default_factory=lambda: Drain(30.0))
    started: int = field(default_factory=lambda: int(time.time()))
    cors_origins: tuple[str, ...] = ()  # browser origins allowed (CORS); none: CORS is off


def api_error_response(error: ApiError) -> JSONResponse:
    """The JSON response for an ApiError."""
    return JSONResponse(error_body(error), status_code=error.status)


def _validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0] if error.errors() else {}
    if first.get("type") == "json_invalid":  # its loc is ("body", character offset)
        offset = first.get("loc", ("body", "?"))[-1]
        reason = first.get("ctx", {}).get("error", "")
        message = f"the body is not valid JSON: {reason} (at character {offset})"
        return api_error_response(ApiError(message))
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    message = first.get("msg", "invalid request")
    param = ".".join(location) or None
    return api_error_response(ApiError(f"{param or 'body'}: {message}", param=param))


def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    if error.status_code in (404, 405):
        what = "no such endpoint" if error.status_code == 404 else "method not allowed"
        message = f"{what}: {request.method} {request.url.path} (the endpoints: GET /docs)"
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return api_error_response(ApiError(message, status=error.status_code, kind=kind))
    return api_error_response(ApiError(str(error.detail), status=error.status_code))


def _qwen3_error(request: Request, error: Qwen3Error) -> JSONResponse:
    if isinstance(error, ServerBusy):
        return api_error_response(ApiError(str(error), status=503, kind="server_busy"))
    if isinstance(error, ResponseFormatError):
        return api_error_response(ApiError(str(error), param="response_format"))
    return api_error_response(api_error(error))


def _unexpected(request: Request, error: Exception) -> JSONResponse:
    return api_error_response(ApiError(f"internal error: {error}", status=500, kind="server_error"))


def create_app(state: ServerState) -> FastAPI:
    """The app for one loaded model."""
    app = FastAPI(title="qwen3-mlx", version="1", summary="OpenAI-compatible Qwen3 server (MLX)")
    app.state.server = state
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Qwen3Error, _qwen3_error)
    app.add_exception_handler(Exception, _unexpected)

    _add_routes(app, state)
    add_responses_routes(app, state, STREAMED)
    add_anthropic_routes(app, state)
    app.add_middleware(Guard, state=state, routes=app.routes)
    app.add_middleware(JsonBodies)
    if state.cors_origins:  # outermost: a preflight is answered before the API key is asked for
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],
        )
    return app


class JsonBodies:
    """Read every POST body as JSON, whatever its Content-Type says: `curl -d` sends form
    encoding, and some clients send none. A body that is not JSON is still a 400."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = dict(scope["headers"])
            if b"json" not in headers.get(b"content-type", b""):
                headers[b"content-type"] = b"application/json"
                scope = {**scope, "headers": list(headers.items())}
        await self.app(scope, receive, send)


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/chat/completions", response_model=p.ChatCompletion, responses=STREAMED)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request) -> Any:
        """Chat, streamed (SSE) or not."""
        # Off the event loop: rendering and tokenizing a long request takes seconds, and /health
        # and every other stream must go on meanwhile.
        prepared = await run_in_threadpool(_prepare_chat, state, body)
        include_usage = bool(
            body.stream and body.stream_options and body.stream_options.include_usage
        )
        field = REASONING_FORMATS.get(body.reasoning_format or "auto")
        run = ChatRun(state, prepared, include_usage or not body.stream, field)
        if body.stream:
            return run.stream(request)
        return JSONResponse(await run.gather(request))

    @app.post("/v1/completions", response_model=p.Completion, responses=STREAMED)
    async def completions(body: p.CompletionRequest, request: Request) -> Any:
        """A raw completion of the prompt (no chat template)."""
        _refuse_unsupported(body)
        prompt = await run_in_threadpool(_completion_prompt, state, body.prompt)
        check_context(len(prompt), state.context_limit)
        explicit = request_settings(body, state.defaults)
        sampling = Sampling.for_mode(state.generation_config, True, explicit)
        prepared = Prepared(prompt, sampling, stops=stop_strings(body.stop))
        prepared.speculative = body.speculative
        run = CompletionRun(state, prepared)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return run.stream(request, include_usage)
        return JSONResponse(await run.gather(request))

    @app.get("/v1/models", response_model=p.ModelList, responses=ERRORS)
    async def models() -> Any:
        """The one model this server runs, with its facts."""
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}", response_model=p.ModelCard, responses=ERRORS)
    async def model(model_id: str) -> Any:
        """The model's card, under the name it is served as."""
        if model_id != state.model_id:
            raise ApiError(
                f"no model {model_id!r}: this server runs {state.model_id!r}",
                status=404,
                kind="not_found_error",
                param="model",
                code="model_not_found",
            )
        return _model_card(state)

    @app.get("/health", response_model=p.Health)
    async def health() -> Any:
        """Liveness and the queue."""
        worker = state.worker
        return {"status": "ok", "queued": worker.queued, "running": worker.running}

    @app.get("/metrics", response_class=Response, responses=ERRORS)
    async def metrics() -> Response:
        """Prometheus text format."""
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/tokenize", response_model=p.TokenizeResponse, responses=ERRORS)
    async def tokenize(body: p.TokenizeRequest) -> Any:
        """Token ids of `prompt`, or of the rendered `messages`."""
        count = _template_ids if body.messages else _prompt_ids
        tokens = await run_in_threadpool(count, state, body)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.context_limit}

    @app.post("/apply-template", response_model=p.ApplyTemplateResponse, responses=ERRORS)
    async def apply_template(body: p.TokenizeRequest) -> Any:
        """The exact prompt text the chat template makes for `messages` (and `tools`)."""
        if not body.messages:
            raise ApiError("messages is required", param="messages")
        text, tokens = await run_in_threadpool(_template_text_and_ids, state, body)
        return {"prompt": text, "tokens": len(tokens)}


def _model_card(state: ServerState) -> dict[str, Any]:
    card = {"id": state.model_id, "object": "model", "created": state.started}
    card.update({"owned_by": "qwen3-mlx", "max_model_len": state.context_limit, **state.facts})
    return card


def _completion_prompt(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = _text_ids(state, prompt)
    else:
        vocab = state.model.args.vocab_size
        if any(not 0 <= token < vocab for token in prompt):
            raise ApiError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        ids = list(prompt)
    if not ids:
        raise ApiError("the prompt is empty", param="prompt")
    return ids


def _prepare_chat(state: ServerState, body: p.ChatCompletionRequest) -> Prepared:
    check_size(body.messages, body.tools, state.context_limit)
    return prepare_chat(state, body)


def _refuse_unsupported(body: p.CompletionRequest) -> None:
    """400 for the legacy completion fields this server does not implement (never ignored)."""
    if body.logprobs is not None:
        raise ApiError(
            "logprobs is not supported on /v1/completions (use /v1/chat/completions with "
            "logprobs and top_logprobs)",
            param="logprobs",
        )
    if body.echo:
        raise ApiError("echo is not supported on /v1/completions", param="echo")


def _prompt_ids(state: ServerState, body: p.TokenizeRequest) -> list[int]:
    return _text_ids(state, body.prompt)


def _text_ids(state: ServerState, text: str | None) -> list[int]:
    if text is None:
        raise ApiError("give prompt or messages", param="prompt")
    if min_tokens(text) >= state.context_limit:  # refused by size: megabytes never tokenized
        message = overflow_message(state.context_limit, f"at least {min_tokens(text):,}", "prompt")
        raise ApiError(message, param="prompt", code="context_length_exceeded")
    return state.tokenizer.encode(text)


def _template_text(state: ServerState, body: p.TokenizeRequest) -> str:
    check_size(body.messages, body.tools, state.context_limit)
    tokenizer = state.tokenizer
    request = p.ChatCompletionRequest(
        messages=body.messages or [],
        tools=body.tools,
        chat_template_kwargs=body.chat_template_kwargs,
        enable_thinking=body.enable_thinking,
    )
    thinking = requested_thinking(request, tokenizer.has_thinking_switch)
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools or []]
    try:
        return tokenizer.render_text(
            chat_messages(body.messages or []),
            tools=tools or None,
            add_generation_prompt=body.add_generation_prompt,
            enable_thinking=thinking if tokenizer.has_thinking_switch else None,
        )
    except Qwen3Error as error:
        raise ApiError(str(error), status=422, param="messages") from None


def _template_ids(state: ServerState, body: p.TokenizeRequest) -> list[int]:
    return state.tokenizer.encode(_template_text(state, body))


def _template_text_and_ids(state: ServerState, body: p.TokenizeRequest) -> tuple[str, list[int]]:
    text = _template_text(state, body)
    return text, state.tokenizer.encode(text)
