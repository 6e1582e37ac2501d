"""The `{"mcpServers": {...}}` file that Qwen-Agent, Claude Desktop, Cursor and llama.cpp read.

A stdio server has `command`, optional `args`, `env` and `cwd`; a remote one has `url`, optional
`headers` and `type` (`streamable-http`, the default, or `sse`). Two optional keys of our own,
`startup_timeout` and `timeout` (seconds), bound the start and each call. Keys other programs add
(`disabled`, `autoApprove`, ...) are ignored, so one file serves them all; every error is one line
naming the file and the server.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_mlx.errors import Qwen3Error

# A first `uvx` run downloads the server and its dependencies: give it a minute, not five seconds.
DEFAULT_STARTUP_TIMEOUT = 60.0
DEFAULT_CALL_TIMEOUT = 120.0
REMOTE_TYPES = ("streamable-http", "sse")


class McpConfigError(Qwen3Error):
    """The MCP config file cannot be read or describes a server wrongly."""


@dataclass(frozen=True)
class ServerConfig:
    """One entry of `mcpServers`: a command to run (stdio) or a URL to reach (remote)."""

    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    transport: str = "stdio"  # "stdio", "streamable-http" or "sse"
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    call_timeout: float = DEFAULT_CALL_TIMEOUT

    def describe(self) -> str:
        """The command line or URL, for messages and logs."""
        if self.transport == "stdio":
            return " ".join([self.command or "", *self.args])
        return f"{self.url} ({self.transport})"


def read_mcp_config(path: str | Path) -> list[ServerConfig]:
    """The servers a config file describes, in file order; McpConfigError names what is wrong."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or error
        raise McpConfigError(f"MCP config {path}: cannot be read ({reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise McpConfigError(
            f"MCP config {path}: not valid JSON ({error.msg} at line {error.lineno}, "
            f"column {error.colno})"
        ) from None
    return parse_mcp_config(data, str(path))


def parse_mcp_config(data: Any, source: str = "MCP config") -> list[ServerConfig]:
    """The servers of an already-decoded config; `source` names it in errors."""
    prefix = f"MCP config {source}" if source != "MCP config" else source
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise McpConfigError(f'{prefix}: expected {{"mcpServers": {{"name": {{...}}, ...}}}}')
    return [_server(name, entry, prefix) for name, entry in servers.items()]


def _server(name: str, entry: Any, prefix: str) -> ServerConfig:
    where = f"{prefix}: server {name!r}"
    if not name.strip():
        raise McpConfigError(f"{prefix}: a server has an empty name")
    if not isinstance(entry, dict):
        raise McpConfigError(f"{where}: must be an object with a command or a url")
    timeouts = {
        "startup_timeout": _seconds(entry, "startup_timeout", DEFAULT_STARTUP_TIMEOUT, where),
        "call_timeout": _seconds(entry, "timeout", DEFAULT_CALL_TIMEOUT, where),
    }
    if "command" in entry and "url" in entry:
        raise McpConfigError(f"{where}: give a command (stdio) or a url (remote), not both")
    if "url" in entry:
        url = entry["url"]
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise McpConfigError(f"{where}: url must be an http:// or https:// address")
        kind = entry.get("type", entry.get("transport", "streamable-http"))
        kind = "streamable-http" if kind in ("http", "streamableHttp") else kind
        if kind not in REMOTE_TYPES:
            raise McpConfigError(f"{where}: type must be one of {', '.join(REMOTE_TYPES)}")
        headers = _strings(entry, "headers", where)
        return ServerConfig(name, url=url, headers=headers, transport=kind, **timeouts)
    command = entry.get("command")
    if not isinstance(command, str) or not command.strip():
        raise McpConfigError(f"{where}: needs a command (stdio) or a url (remote)")
    args = entry.get("args", [])
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        raise McpConfigError(f"{where}: args must be a list of strings")
    cwd = entry.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise McpConfigError(f"{where}: cwd must be a folder path")
    env = _strings(entry, "env", where)
    cwd = str(Path(cwd).expanduser()) if cwd else None
    return ServerConfig(name, command=command, args=tuple(args), env=env, cwd=cwd, **timeouts)


def _strings(entry: dict, key: str, where: str) -> dict[str, str]:
    value = entry.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise McpConfigError(f"{where}: {key} must be an object of strings")
    return dict(value)


def _seconds(entry: dict, key: str, default: float, where: str) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise McpConfigError(f"{where}: {key} must be a positive number of seconds")
    if not math.isfinite(value):
        raise McpConfigError(f"{where}: {key} must be finite")
    return float(value)
