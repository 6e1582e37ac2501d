"""Build a server for a loaded model and run it with uvicorn."""

from __future__ import annotations

import errno
import math
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.parallel.lockstep import LeaderModel
from qwen3_mlx.parallel.watchdog import StallWatchdog, rank_timeout
from qwen3_mlx.server.app import ServerState, create_app
from qwen3_mlx.server.guard import allowed_hosts
from qwen3_mlx.server.metrics import Metrics
from qwen3_mlx.server.prefix_cache import PrefixCache
from qwen3_mlx.server.shutdown import (
    MAX_CONNECTIONS,
    Drain,
    DrainingServer,
    bounded_protocol,
    silence_sse_shutdown,
)
from qwen3_mlx.server.worker import GenerationWorker
from qwen3_mlx.tokenizer import IM_END_ID

# "content": the think block stays in the content, `<think>` and `</think>` included (llama.cpp's
# --reasoning-format none, Qwen-Agent's thought_in_content).
REASONING_FIELDS = ("reasoning_content", "reasoning", "both", "content")


@dataclass
class ServeOptions:
    """The options of `qwen3-mlx serve` beyond the model."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_concurrency: int = 8  # replies decoded together in one batch
    max_queue: int = 32  # requests waiting for a place in the batch; more get 503
    prompt_cache_bytes: int = 4 << 30
    reasoning_field: str = "reasoning_content"
    context_length: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    ping_seconds: float = 10.0
    allow_hosts: tuple[str, ...] = ()  # Host names beyond loopback's ('*': any)
    shared_prompt_cache: bool = True  # False: no reply reuses another's cached prefix
    request_seconds: float = 60.0  # a request's head and body must arrive within this
    drain_seconds: float = 30.0  # replies in flight at a stop signal may run this long
    # Under a group: called (from a watchdog thread) once the replies in flight have failed
    # because a rank stopped answering; it must end the process (the decoding thread is stuck).
    on_lost_rank: Callable[[Qwen3Error], None] | None = None
    cors_origins: tuple[str, ...] = ()
    kv_bits: int | None = None  # idle prefix-cache entries kept quantized


class ServeError(Qwen3Error):
    """The server cannot start (its address is taken or not this machine's)."""


def served_model_id(model: str, served_name: str | None = None) -> str:
    """The id clients see: the alias when given, a local folder's name (never its path), a hub
    id as typed."""
    if served_name:
        return served_name
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model


def build_state(
    model: Any,
    tokenizer: Any,
    generation_config: Any,
    model_id: str,
    options: ServeOptions,
    speculation: Any = None,
) -> ServerState:
    """The state of a server for this model (its worker not started yet); speculation: a
    speculative.Speculation for replies that run alone."""
    metrics = Metrics()
    context_limit = int(options.context_length or model.args.context_length)
    worker = GenerationWorker(
        model,
        tokenizer,
        PrefixCache(
            model,
            options.prompt_cache_bytes,
            kv_bits=options.kv_bits,
            shared=options.shared_prompt_cache,
        ),
        stop_ids=frozenset(generation_config.eos_token_ids) | {IM_END_ID},
        context_limit=context_limit,
        max_batch=options.max_concurrency,
        max_queue=options.max_queue,
        metrics=metrics,
        speculation=speculation,
    )
    if isinstance(model, LeaderModel) and options.on_lost_rank is not None:
        worker.watchdog = _lost_rank_watchdog(worker, options.on_lost_rank)
    return ServerState(
        model=model,
        tokenizer=tokenizer,
        generation_config=generation_config,
        model_id=model_id,
        context_limit=context_limit,
        worker=worker,
        metrics=metrics,
        reasoning_field=options.reasoning_field,
        api_key=options.api_key,
        defaults=dict(options.sampling),
        ping_seconds=options.ping_seconds,
        cors_origins=tuple(options.cors_origins),
        facts={"thinking_switch": tokenizer.has_thinking_switch},
        allowed_hosts=allowed_hosts(options.host, options.allow_hosts),
        drain=Drain(options.drain_seconds),
    )


def _lost_rank_watchdog(
    worker: GenerationWorker, on_lost_rank: Callable[[Qwen3Error], None]
) -> StallWatchdog:
    def on_stall(error: Qwen3Error) -> None:
        worker.abandon(error)  # each request in flight gets its error (event) first
        on_lost_rank(error)

    return StallWatchdog(rank_timeout(), on_stall)


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads, so a taken port is one line at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise ServeError(
                f"port {port} on {host} is already in use (another server?); choose another "
                "with --port"
            ) from None
        if error.errno == errno.EADDRNOTAVAIL:
            raise ServeError(f"{host} is not an address of this machine (--host)") from None
        raise ServeError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    except (socket.gaierror, UnicodeError) as error:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {error}") from None
    return sock


def serve(
    state: ServerState,
    sock: socket.socket,
    *,
    request_seconds: float = 60.0,
    log_level: str = "info",
) -> None:
    """Run the server on `sock` until SIGINT or SIGTERM, then return once the replies in flight
    have ended (within the drain bound) and the worker has stopped."""
    import uvicorn

    silence_sse_shutdown()
    config = uvicorn.Config(
        create_app(state),
        log_level=log_level,
        http=bounded_protocol(request_seconds),
        limit_concurrency=MAX_CONNECTIONS,
        # A backstop: the drain ends every stream by its bound, and uvicorn then returns.
        timeout_graceful_shutdown=math.ceil(state.drain.seconds) + 5,
    )
    server = DrainingServer(config, state.drain)
    state.worker.start()
    try:
        with stop_signals_caught():
            server.run(sockets=[sock])
    finally:
        state.worker.stop()


class _Stopped(Exception):
    """A stop signal, raised after uvicorn's graceful shutdown."""


@contextmanager
def stop_signals_caught() -> Iterator[None]:
    """Make SIGINT and SIGTERM a normal end of the server.

    uvicorn shuts down gracefully on either, then raises the signal again for the handlers it
    found; these turn it into a return, so the caller's clean-up runs (under a group: stopping
    the other ranks), where SIGTERM's default would end the process at once.
    """

    def stop(signum: int, frame: Any) -> None:
        raise _Stopped

    if threading.current_thread() is not threading.main_thread():
        yield  # (signals reach the main thread only)
        return
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
