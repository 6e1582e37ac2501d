"""MCP servers for a synchronous front end: one background event loop, one task per server.

The `mcp` SDK is async only (anyio). Each server's transport and ClientSession are entered and
left inside one long-lived task, as anyio's cancel scopes require (Qwen-Agent enters and exits
them in different tasks and then silences the error that causes). Calls are submitted from the
front end's thread and waited for with a deadline; Ctrl-C there cancels the call's task only.
Stdio servers run in their own session (process group), so a Ctrl-C typed at the terminal never
reaches them; leaving the session closes their stdin and, after a grace period, the SDK kills the
whole process tree. Server stderr goes to one log file per server (kept bounded, server_log.py),
never to the screen.
"""

from __future__ import annotations

import asyncio
import atexit
import math
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from qwen3_mlx.mcp.config import ServerConfig
from qwen3_mlx.mcp.naming import McpTool, find_tool, named_tools
from qwen3_mlx.mcp.results import ToolOutcome, outcome_from_result
from qwen3_mlx.mcp.server_log import keep_bounded, last_line, open_log
from qwen3_mlx.tool_loop import cut_text
from qwen3_mlx.visible import visible, visible_name

STOP_GRACE = 8.0
DESCRIPTION_BUDGET = 8_000  # characters of one tool's description (about 2,000 tokens)  # the SDK waits 2 s for a clean exit, then SIGTERM, then SIGKILL


@dataclass
class ServerState:
    """How one server is doing: its tools once started, or why it is not running."""

    config: ServerConfig
    log_path: Path
    tools: list[McpTool] = field(default_factory=list)
    error: str | None = None
    session: Any = None
    ready: threading.Event = field(default_factory=threading.Event)
    stop: asyncio.Event | None = None
    task: Future | None = None

    @property
    def running(self) -> bool:
        """Whether the server started and its session is open."""
        return self.session is not None


class McpManager:
    """Starts the configured servers, lists their tools, runs calls and stops them all.

    Use as a context manager, or call close(); an atexit hook closes a forgotten one.
    """

    def __init__(self, servers: Sequence[ServerConfig], *, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.states = {
            server.name: ServerState(server, self.log_dir / f"mcp-{_file_part(server.name)}.log")
            for server in servers
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._tools: list[McpTool] = []

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Begin starting every server in the background (returns at once)."""
        if self._loop is not None or not self.states:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="qwen3-mlx-mcp", daemon=True
        )
        self._thread.start()
        atexit.register(self.close)
        for state in self.states.values():
            state.task = asyncio.run_coroutine_threadsafe(self._serve(state), self._loop)

    def wait_started(self) -> list[str]:
        """Wait until each server has started or failed; one line for each that failed."""
        self.start()
        for state in self.states.values():
            # _serve enforces the startup deadline; this margin only guards against a stuck loop.
            if not state.ready.wait(state.config.startup_timeout + STOP_GRACE):
                state.error = state.error or "did not start (the event loop is stuck)"
        self._tools = named_tools(tool for s in self.states.values() for tool in s.tools)
        problems = [
            f"MCP server {name!r} not started: {visible(state.error)} (log: {state.log_path})"
            for name, state in self.states.items()
            if state.error is not None
        ]
        return problems + self._cut_descriptions()

    def _cut_descriptions(self) -> list[str]:
        # Every prompt carries every description: one that fills the context would fail them all.
        lines = []
        for index, tool in enumerate(self._tools):
            description, cut = cut_text(tool.description, DESCRIPTION_BUDGET)
            if cut:
                self._tools[index] = replace(tool, description=description)
                lines.append(
                    f"MCP tool {visible_name(tool.label)}: its description is "
                    f"{len(tool.description):,} characters; the model gets the first "
                    f"{DESCRIPTION_BUDGET:,}"
                )
        return lines

    def close(self) -> None:
        """Stop every server (their whole process trees) and the loop; safe to call twice."""
        if self._closed or self._loop is None:
            self._closed = True
            return
        self._closed = True
        loop = self._loop
        for state in self.states.values():
            if state.stop is not None:
                loop.call_soon_threadsafe(state.stop.set)
        deadline = time.monotonic() + STOP_GRACE
        for state in self.states.values():
            if state.task is not None:
                try:
                    state.task.result(max(0.1, deadline - time.monotonic()))
                except (FutureTimeout, Exception):
                    state.task.cancel()
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(2.0)
        atexit.unregister(self.close)

    def __enter__(self) -> McpManager:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- tools --------------------------------------------------------------------------------

    @property
    def tools(self) -> list[McpTool]:
        """Every tool of every started server, with the names the model uses."""
        return list(self._tools)

    def find(self, function_name: str) -> McpTool | None:
        """The tool the model calls by this name, if any (see naming.find_tool)."""
        return find_tool(self._tools, function_name)

    def functions(self) -> list[dict[str, Any]]:
        """The tools in OpenAI's function format, for Chat(tools=...)."""
        return [tool.function() for tool in self._tools]

    def call(self, tool: McpTool, arguments: dict[str, Any]) -> ToolOutcome:
        """Run one call; a timeout, a protocol error or a dead server comes back as an error outcome.

        KeyboardInterrupt while waiting cancels the call (the server is told) and is re-raised.
        """
        state = self.states[tool.server]
        if not state.running or self._loop is None:
            reason = state.error or "it has stopped"
            return ToolOutcome(f"the MCP server {tool.server!r} is not running ({reason})", True)
        future = asyncio.run_coroutine_threadsafe(self._call(state, tool, arguments), self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    # --- inside the loop ----------------------------------------------------------------------

    async def _serve(self, state: ServerState) -> None:
        import anyio
        from mcp import ClientSession

        config = state.config
        state.stop = asyncio.Event()
        log = open_log(state.log_path, f"{config.name!r}: {config.describe()}")
        start_offset = log.tell()
        watcher = asyncio.ensure_future(keep_bounded(state.log_path, log))
        try:
            with anyio.CancelScope(deadline=anyio.current_time() + config.startup_timeout) as scope:
                async with _transport(config, log) as streams:
                    async with ClientSession(streams[0], streams[1]) as session:
                        await session.initialize()
                        state.tools = await _list_tools(session, config.name)
                        scope.deadline = math.inf  # started: from now on only stop ends it
                        state.session = session
                        state.ready.set()
                        await state.stop.wait()
            if scope.cancelled_caught and not state.ready.is_set():
                state.error = _startup_timeout_message(config)
        except BaseException as error:  # noqa: BLE001 (reported; the chat goes on without it)
            state.error = state.error or _start_error(error, config, state.log_path, start_offset)
        finally:
            state.session = None
            if state.error is None and not state.ready.is_set():
                state.error = "it exited at start"
            state.ready.set()
            watcher.cancel()
            log.close()

    async def _call(self, state: ServerState, tool: McpTool, arguments: dict) -> ToolOutcome:
        import anyio

        timeout = state.config.call_timeout
        try:
            with anyio.fail_after(timeout):
                result = await state.session.call_tool(tool.name, arguments)
        except TimeoutError:
            return ToolOutcome(f"the tool did not answer within {timeout:g} s", True)
        except Exception as error:  # noqa: BLE001 (a protocol error is a result for the model)
            if state.session is None or _connection_closed(error):
                return self._stopped(state)
            return ToolOutcome(_leaf_message(error), True)
        return outcome_from_result(result)

    def _stopped(self, state: ServerState) -> ToolOutcome:
        # The server process exited (crashed, or killed): leave its session so the SDK reaps the
        # process, and answer this call and every later one with the same line.
        state.error = "it stopped during the session"
        state.session = None
        if state.stop is not None:
            state.stop.set()
        return ToolOutcome(f"the MCP server {state.config.name!r} stopped during the session", True)


def _connection_closed(error: BaseException) -> bool:
    from mcp.types import CONNECTION_CLOSED

    return getattr(_leaf(error), "code", None) == CONNECTION_CLOSED


@asynccontextmanager
async def _transport(config: ServerConfig, log: IO[str]) -> Any:
    if config.transport == "stdio":
        from mcp import StdioServerParameters
        from mcp.client.stdio import stdio_client

        parameters = StdioServerParameters(
            command=config.command, args=list(config.args), env=config.env or None, cwd=config.cwd
        )
        async with stdio_client(parameters, errlog=log) as streams:
            yield streams
    elif config.transport == "sse":
        from mcp.client.sse import sse_client

        async with sse_client(config.url, headers=config.headers or None) as streams:
            yield streams
    else:
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        async with create_mcp_http_client(headers=config.headers or None) as http:
            async with streamable_http_client(config.url, http_client=http) as streams:
                yield streams


async def _list_tools(session: Any, server: str) -> list[McpTool]:
    tools, cursor = [], None
    while True:
        if cursor is None:
            page = await session.list_tools()
        else:
            from mcp.types import PaginatedRequestParams

            page = await session.list_tools(params=PaginatedRequestParams(cursor=cursor))
        for tool in page.tools:
            schema = dict(tool.input_schema or {})
            tools.append(McpTool(server, tool.name, tool.description or "", schema))
        cursor = getattr(page, "next_cursor", None)
        if not cursor:
            return tools


def _startup_timeout_message(config: ServerConfig) -> str:
    text = f"no answer to initialize within {config.startup_timeout:g} s"
    if config.command and Path(config.command).name in ("uvx", "npx", "uv", "bunx", "pipx"):
        text += (
            f" (a first {Path(config.command).name} run downloads the server and can be slow: "
            "run the command once in a shell, or raise startup_timeout in the config)"
        )
    return text


def _start_error(error: BaseException, config: ServerConfig, log_path: Path, offset: int) -> str:
    leaf = _leaf(error)
    if isinstance(leaf, FileNotFoundError) and config.transport == "stdio":
        if config.cwd and not Path(config.cwd).is_dir():
            return f"its cwd {config.cwd} is not a folder"
        return f"command {config.command!r} not found"
    if isinstance(leaf, (KeyboardInterrupt, asyncio.CancelledError)):
        return "start cancelled"
    message = _leaf_message(leaf)
    last = last_line(log_path, offset)
    if "closed" in message.lower() and config.transport == "stdio":
        message = "it exited at start" + (f": {last}" if last else "")
    return message


def _leaf(error: BaseException) -> BaseException:
    # An anyio task group raises an exception group (a builtin only from Python 3.11).
    while getattr(error, "exceptions", None):
        error = error.exceptions[0]  # type: ignore[attr-defined]
    return error


def _leaf_message(error: BaseException) -> str:
    error = _leaf(error)
    text = " ".join(str(error).split()) or type(error).__name__
    return text


def _file_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "server"
