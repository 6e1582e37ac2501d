"""The server the test_server* modules run: the tiny trained model, in-process, on a free port.

The model loads once per test session; each module gets its own server (its own prefix cache,
worker and metrics) on a loopback port the OS picked.
"""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from qwen3_mlx.server.app import ServerState, create_app
from qwen3_mlx.server.runner import ServeOptions, build_state

TINY_MODEL = Path(__file__).resolve().parent.parent / "models" / "qwen3-tiny-chat"
API_KEY = "test-key"


@functools.lru_cache(maxsize=1)
def tiny_model() -> tuple[Any, Any, Any]:
    """(model, tokenizer, generation_config) of the tiny chat model, loaded once."""
    from qwen3_mlx.loading import load

    return load(TINY_MODEL)


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(**options: Any) -> Iterator[tuple[str, ServerState]]:
    """(base URL, state) of a server running in a thread until the block ends (speculation:
    build_state's, the rest ServeOptions)."""
    model, tokenizer, generation_config = tiny_model()
    options.setdefault("api_key", API_KEY)
    speculation = options.pop("speculation", None)
    state = build_state(
        model,
        tokenizer,
        generation_config,
        "qwen3-tiny-chat",
        ServeOptions(**options),
        speculation=speculation,
    )
    port = free_port()
    config = uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    state.worker.start()
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", state
    finally:
        server.should_exit = True
        thread.join(10)
        state.worker.stop()


def agents_lookup_tool(asked: list[str], secret: str) -> Any:
    """An openai-agents function tool `lookup` that records each key asked and returns `secret`."""
    import agents

    @agents.function_tool
    def lookup(key: str) -> str:
        """Look up the secret word for a key."""
        asked.append(key)
        return secret

    return lookup
