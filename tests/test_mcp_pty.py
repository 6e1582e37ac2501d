"""`chat --mcp-config` in a real pseudo-terminal: the header announces the tools, /tools lists
them, a server that fails is named in one line, and Ctrl-D leaves no server process behind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil
from test_repl_pty import babbling_model, command, quit_with_ctrl_d, spawn_chat  # noqa: F401

TIME = {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone=UTC"]}


def test_header_tools_command_and_no_orphans_after_ctrl_d(
    tmp_path: Path,
    babbling_model: Path,  # noqa: F811
) -> None:
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"time": TIME, "gone": {"command": "no-such-x"}}}))
    child = spawn_chat(tmp_path, "-m", str(babbling_model), "--mcp-config", str(config))
    child.logfile_read.flush()
    header = (tmp_path / "pty.log").read_text(encoding="utf-8")
    assert "MCP server 'gone' not started: command 'no-such-x' not found" in header
    assert "tools: 2 tools from time · /tools lists them" in header
    servers = psutil.Process(child.pid).children(recursive=True)
    assert servers, "the time server runs as a child of chat"
    out = command(child, "/tools")
    assert "time.get_current_time" in out and "time.convert_time" in out
    assert quit_with_ctrl_d(child) == 0
    _, alive = psutil.wait_procs(servers, timeout=10)
    assert alive == []
    log = tmp_path / "home" / ".local" / "state" / "qwen3-mlx" / "mcp-time.log"
    assert log.is_file()
