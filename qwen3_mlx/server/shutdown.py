"""Stopping the server: replies in flight end first, within a bound; requests cannot stall it.

On SIGINT or SIGTERM uvicorn stops accepting connections and waits for the open ones. The replies
in flight go on to their end (finish_reason, [DONE]); one still running when the drain bound
passes ends with an error event (a 503 when not streamed). sse-starlette's own reaction to the
signal, cutting every stream at once with no last event, is turned off.

A connection must deliver each request, head and body, within the request timeout, or it is
closed: a client that sends half a request and waits holds no descriptor for long.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from qwen3_mlx.server.requests import ApiError

# Connections beyond this get 503 (each holds a descriptor; macOS allows 256 by default).
MAX_CONNECTIONS = 200


class Drain:
    """When the server began to stop, and how long replies in flight may still run."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.since: float | None = None

    def begin(self) -> None:
        """The server is stopping (the first signal counts)."""
        if self.since is None:
            self.since = time.monotonic()

    @property
    def over(self) -> bool:
        """Whether the replies in flight have had their time."""
        return self.since is not None and time.monotonic() - self.since > self.seconds

    def error(self) -> ApiError:
        """The error a reply still running at the bound ends with."""
        return ApiError(
            f"the server is shutting down and this reply did not end within {self.seconds:g} s",
            status=503,
            kind="server_error",
            code="server_shutting_down",
        )


class DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the drain when a stop signal arrives."""

    def __init__(self, config: uvicorn.Config, drain: Drain):
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: Any) -> None:
        """Begin the drain, then uvicorn's graceful shutdown."""
        self.drain.begin()
        super().handle_exit(sig, frame)


def bounded_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request has not fully arrived within
    `seconds` of its first byte (or of the connection, for the first request)."""

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.request_deadline: asyncio.TimerHandle | None = None
            self._watch()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._stop_watching()  # idle now: uvicorn's keep-alive timeout takes over

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_watching()
            super().connection_lost(exc)

        def _watch(self) -> None:
            waiting = self.conn.their_state in (h11.IDLE, h11.SEND_BODY)
            if waiting and self.request_deadline is None:
                self.request_deadline = self.loop.call_later(seconds, self._expire)
            elif not waiting:
                self._stop_watching()

        def _stop_watching(self) -> None:
            if self.request_deadline is not None:
                self.request_deadline.cancel()
                self.request_deadline = None

        def _expire(self) -> None:
            self.request_deadline = None
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                if self.cycle is not None and not self.cycle.response_complete:
                    self.cycle.disconnected = True  # a route waiting for the body sees it gone
                    self.cycle.message_event.set()
                self.transport.close()

    return BoundedH11Protocol


def silence_sse_shutdown() -> None:
    """Keep sse-starlette from cutting streams at a stop signal (the drain ends them)."""
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()
