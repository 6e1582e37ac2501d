"""MCP tools in the CLI: start the servers, keep the session's consent and step limit, and give
each view the tool loop with its own hooks.

`chat` and `prompt` share this and `qwen3_mlx.tool_loop`; they differ only in how they ask (a
line reader, the terminal, or never) and how they show a step (rich lines, or stderr).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qwen3_mlx.mcp import Consent, McpManager
from qwen3_mlx.tool_loop import ToolLoop, ToolStep
from qwen3_mlx.tools import ToolCall

if TYPE_CHECKING:  # types only: importing chat loads mlx, and `--help` must not
    from qwen3_mlx.chat import Chat


@dataclass
class ToolSession:
    """The MCP servers of one chat or prompt run, what may run unasked, and the step limit."""

    manager: McpManager
    consent: Consent
    max_steps: int = 8
    enabled: bool = True
    problems: list[str] = field(default_factory=list)

    def wait_started(self, chat: Chat) -> list[str]:
        """Wait for the servers, give their tools to the chat; one line per server that failed."""
        self.problems = self.consent.problems + self.manager.wait_started()
        chat.tools = self.manager.functions() if self.enabled else []
        return self.problems

    def switch(self, chat: Chat, on: bool) -> None:
        """Turn the tools on or off for the next replies."""
        self.enabled = on
        chat.tools = self.manager.functions() if on else []

    def summary(self) -> str:
        """`3 tools from time, files` (or why there are none)."""
        tools = self.manager.tools
        servers = sorted({tool.server for tool in tools})
        if not tools:
            return "no MCP tools (no server started)"
        text = f"{len(tools)} tool{'s' if len(tools) != 1 else ''} from {', '.join(servers)}"
        return text if self.enabled else text + " (off)"

    def loop(
        self,
        before_call: Callable[[Any, ToolCall], str],
        on_step: Callable[[ToolStep], None],
        while_running: Callable[[str], AbstractContextManager] = lambda label: nullcontext(),
    ) -> ToolLoop:
        """The tool loop over these servers, with a view's hooks."""
        return ToolLoop(
            self.manager, self.consent, before_call, on_step, while_running, self.max_steps
        )


def open_tool_session(spec: Any) -> ToolSession | None:
    """Read the MCP config the options name and start its servers in the background."""
    from qwen3_mlx.cli.user_config import mcp_log_dir
    from qwen3_mlx.mcp import read_mcp_config

    if spec.mcp_config is None or not spec.tools_enabled:
        return None
    servers = read_mcp_config(spec.mcp_config)
    manager = McpManager(servers, log_dir=mcp_log_dir())
    manager.start()
    consent = Consent(spec.mcp_allow, yes=spec.yes, servers=[server.name for server in servers])
    return ToolSession(manager, consent, spec.max_tool_steps)


def terminal_asker() -> Callable[[str], str]:
    """A prompt_toolkit reader for consent answers: its own prompt, no line history."""
    from prompt_toolkit import PromptSession

    session: Any = PromptSession()

    def read(question: str) -> str:
        return session.prompt(question)

    return read


def stderr_asker(read_line: Callable[[], str]) -> Callable[[str], str]:
    """Consent answers from a terminal on stdin while stdout goes elsewhere: ask on stderr."""

    def read(question: str) -> str:
        sys.stderr.write(question)
        sys.stderr.flush()
        return read_line()

    return read
