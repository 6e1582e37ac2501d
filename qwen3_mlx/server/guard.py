"""What every request passes before any route sees it: the Host name, the API key, the body's size.

One ASGI middleware, outside the routes:
- While the server is bound to loopback it answers only loopback Host names, so a web page cannot
  reach it by DNS rebinding (a name of the attacker's that resolves to 127.0.0.1).
- The API key is compared in constant time.
- The body is counted as it arrives, whatever Content-Length says (a chunked body has none), and
  refused with 413 once it passes the bound: a route never sees more than the bound.
- /metrics counts each request under its route's template (one label for every unknown path), so
  a client cannot add series by inventing URLs.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwen3_mlx.limits import MAX_TOKEN_BYTES
from qwen3_mlx.server.requests import ApiError, overflow_message

if TYPE_CHECKING:  # types only: app.py imports this module
    from qwen3_mlx.server.app import ServerState

OPEN_PATHS = ("/health", "/docs", "/openapi.json", "/redoc")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
UNMATCHED = "unmatched"


def is_loopback(host: str) -> bool:
    """Whether a bind address or Host name means this machine only."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind: str, allowed: Iterable[str] | None) -> frozenset[str] | None:
    """The Host names to answer (None: any): loopback names while bound to loopback unless
    `allowed` says otherwise ('*' for any)."""
    if allowed:
        names = frozenset(name.lower() for name in allowed)
        return None if "*" in names else names | LOOPBACK_NAMES
    return LOOPBACK_NAMES if is_loopback(bind) else None


def host_name(header: str) -> str:
    """The name of a Host header, without its port ('[::1]:8000' -> '::1')."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """The ASGI middleware described above; `state` is the ServerState."""

    def __init__(self, app: ASGIApp, state: ServerState, routes: list[Any]):
        self.app = app
        self.state = state
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refusal = self.refusal(scope)
            if refusal is None:
                body = await self.read_body(scope, receive)
                if isinstance(body, ApiError):
                    refusal = body
                else:
                    await self.app(scope, replay(body, receive), send_status)
                    return
            await respond(refusal, scope, send_status)
        finally:
            self.state.metrics.requests.labels(self.route_label(scope), str(status)).inc()

    def refusal(self, scope: Scope) -> ApiError | None:
        """400 for a Host name not answered, 401 without the key, 413 for a declared length over
        the bound."""
        headers = {
            key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]
        }
        hosts = self.state.allowed_hosts
        if hosts is not None and host_name(headers.get("host", "")) not in hosts:
            return ApiError(
                f"the Host name {headers.get('host', '')!r} is not one this server answers "
                "(serve --allow-host adds names)",
                code="invalid_host",
            )
        key = self.state.api_key
        if key and scope["path"] not in OPEN_PATHS:
            bearer = headers.get("authorization", "").encode("utf-8", "surrogateescape")
            # Anthropic's clients send the key as x-api-key.
            x_key = headers.get("x-api-key", "").encode("utf-8", "surrogateescape")
            if not (
                hmac.compare_digest(bearer, f"Bearer {key}".encode())
                | hmac.compare_digest(x_key, key.encode())
            ):
                return ApiError(
                    "missing or wrong API key (Authorization: Bearer ... or x-api-key: ...)",
                    status=401,
                    kind="authentication_error",
                    code="invalid_api_key",
                )
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.state.max_body_bytes:
            return self.too_large(int(length))
        return None

    def too_large(self, size: int, at_least: bool = False) -> ApiError:
        """The 413 for a body of `size` bytes (at_least: of which `size` were read so far)."""
        bound = f"{self.state.max_body_bytes:,}-byte limit"
        if at_least:
            return ApiError(f"the request body is over the {bound} (stopped reading)", status=413)
        return ApiError(f"the request body is {size:,} bytes, over the {bound}", status=413)

    async def read_body(self, scope: Scope, receive: Receive) -> list[Message] | ApiError:
        """The body's messages, read whole; a 413 as soon as they pass the bound."""
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return []
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages  # the client went away: the route sees the disconnect
            size += len(message.get("body", b""))
            if size > self.state.max_body_bytes:
                return self.too_large(size, at_least=True)
            if not message.get("more_body"):
                return messages

    def route_label(self, scope: Scope) -> str:
        """The template of the route the path matches, or one label for every other path."""
        routed = scope.get("route")  # set by the router once it dispatched the request
        if routed is not None and getattr(routed, "path", None):
            return routed.path
        return _template(self.routes, scope) or UNMATCHED  # refused before routing, or no route


def _template(routes: Iterable[Any], scope: Scope) -> str | None:
    """The path template of the first route matching scope, looking inside included routers."""
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.NONE:
            continue
        # FastAPI keeps an included router (the Anthropic routes) as one route whose own
        # candidates carry the templates.
        candidates = getattr(route, "effective_candidates", None)
        found = _template(candidates(), scope) if callable(candidates) else None
        found = found or getattr(route, "path", None)
        if found:
            return found
    return None


def replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive that gives the body read already, then the client's later messages."""
    pending = list(messages)

    async def next_message() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return next_message


async def respond(error: ApiError, scope: Scope, send: Send) -> None:
    """Send an ApiError as the API's error object (Anthropic's on its routes, else OpenAI's),
    closing the connection (a body may be unread)."""
    from fastapi.responses import JSONResponse

    from qwen3_mlx.server import anthropic, anthropic_events, generation

    if scope["path"].startswith(anthropic.PREFIX):
        body = anthropic_events.error_body(error.status, str(error))
    else:
        body = generation.error_body(error)
    response = JSONResponse(body, status_code=error.status)
    response.headers["connection"] = "close"
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _utf8_size(value: Any) -> int:
    """UTF-8 bytes of a text, or of a value's compact JSON (the template renders it at least
    this long)."""
    if not value:
        return 0
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return len(value.encode("utf-8", "surrogatepass"))


def check_size(messages: Any, tools: Any, context_limit: int) -> None:
    """400 context_length_exceeded when the text of the messages and tools alone is more than the
    context can hold (its UTF-8 bytes / 128, the longest token): refused before anything is
    rendered or tokenized, so a huge request costs no more than reading it."""
    size = 0
    for message in messages or []:
        content = message.content
        if isinstance(content, str):
            size += _utf8_size(content)
        elif content:
            size += sum(_utf8_size(part.text) for part in content)
        size += sum(_utf8_size(call.function.arguments) for call in message.tool_calls or [])
    bound, param = MAX_TOKEN_BYTES * context_limit, "messages"
    if size < bound:
        for tool in tools or []:
            size += _utf8_size(tool.model_dump(exclude_none=True))
            param = "tools"
            if size >= bound:
                break
    if size >= bound:
        tokens = f"at least {size // MAX_TOKEN_BYTES:,}"  # (its bytes / the longest token's)
        raise ApiError(
            overflow_message(context_limit, tokens, param),
            param=param,
            code="context_length_exceeded",
        )
