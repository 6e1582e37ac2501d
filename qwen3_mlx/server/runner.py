"""Build a server for a loaded model and run it with uvicorn."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_mlx.server.app import ServerState, create_app
from qwen3_mlx.server.metrics import Metrics
from qwen3_mlx.server.prefix_cache import PrefixCache
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
    cors_origins: tuple[str, ...] = ()
    kv_bits: int | None = None  # idle prefix-cache entries kept quantized


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
        PrefixCache(model, options.prompt_cache_bytes, kv_bits=options.kv_bits),
        stop_ids=frozenset(generation_config.eos_token_ids) | {IM_END_ID},
        context_limit=context_limit,
        max_batch=options.max_concurrency,
        max_queue=options.max_queue,
        metrics=metrics,
        speculation=speculation,
    )
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
    )


def serve(state: ServerState, host: str, port: int, log_level: str = "info") -> None:
    """Run the server until SIGINT or SIGTERM, then return once the worker has stopped."""
    import uvicorn

    state.worker.start()
    try:
        with stop_signals_caught():
            uvicorn.run(create_app(state), host=host, port=port, log_level=log_level)
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
