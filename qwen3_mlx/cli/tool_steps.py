"""MCP tools in the CLI: start the servers, ask before each call, run it, and answer the model.

`chat` and `prompt` share this; they differ only in how they ask (a line reader, or never) and
how they show a step (rich lines, or stderr).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from qwen3_mlx.mcp import Consent, McpManager, McpTool, ToolOutcome
from qwen3_mlx.tools import ToolCall, ToolResult

DECLINED = "The user declined to run this tool call."
CANCELLED = "The user cancelled this tool call (Ctrl-C) before it finished."
ANSWERS = {"y": "yes", "yes": "yes", "n": "no", "no": "no", "a": "always", "always": "always"}
QUESTION = "[y]es / [n]o / [a]lways for this tool"

Ask = Callable[[McpTool, ToolCall], str]  # returns "yes", "no" or "always"


@dataclass
class ToolSession:
    """The MCP servers of one chat or prompt run, what may run unasked, and the step limit."""

    manager: McpManager
    consent: Consent
    max_steps: int = 8
    enabled: bool = True
    problems: list[str] = field(default_factory=list)

    def wait_started(self, chat: Any) -> list[str]:
        """Wait for the servers, give their tools to the chat; one line per server that failed."""
        self.problems = self.manager.wait_started()
        chat.tools = self.manager.functions() if self.enabled else []
        return self.problems

    def switch(self, chat: Any, on: bool) -> None:
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


@dataclass
class ToolStep:
    """One call of a reply and what came of it."""

    call: ToolCall
    label: str  # server.tool, or the name the model wrote when no tool has it
    outcome: ToolOutcome
    status: str  # "ran" | "declined" | "cancelled" | "unknown" | "invalid"

    def result(self) -> ToolResult:
        """The tool message for the model."""
        return ToolResult(self.outcome.content(), self.call.id, self.call.name)

    def record(self) -> dict[str, Any]:
        """The step for `prompt --json`."""
        return {
            "tool": self.label,
            "arguments": self.call.arguments,
            "status": self.status,
            "is_error": self.outcome.is_error,
            "result": self.outcome.text,
        }


def shown_call(label: str, call: ToolCall) -> str:
    """`server.tool({"a": 1})`: the call as a person reads it."""
    arguments = json.dumps(call.arguments, ensure_ascii=False) if call.arguments else ""
    return f"{label}({arguments})"


def parse_answer(line: str) -> str | None:
    """'yes', 'no' or 'always' for a typed answer; None when it is none of them."""
    return ANSWERS.get(line.strip().lower())


def run_calls(
    session: ToolSession,
    calls: tuple[ToolCall, ...],
    ask: Ask,
    on_run: Callable[[str], Any] | None = None,
) -> list[ToolStep]:
    """Ask for (or find) consent for each valid call, run the allowed ones, and return the steps.

    on_run(label) gives a context manager held while a call runs (a spinner). Ctrl-C during a
    call cancels it and the calls after it; the steps still answer every call.
    """
    steps: list[ToolStep] = []
    cancelled = False
    for call in calls:
        if not call.valid:
            message = f"the call was not run: {call.error}; write it as valid JSON"
            steps.append(ToolStep(call, call.name or "?", ToolOutcome(message, True), "invalid"))
            continue
        tool = session.manager.find(call.name)
        if tool is None:
            names = ", ".join(t.function_name for t in session.manager.tools) or "none"
            outcome = ToolOutcome(
                f"there is no tool named {call.name!r} (the tools: {names})", True
            )
            steps.append(ToolStep(call, call.name, outcome, "unknown"))
            continue
        if cancelled:
            steps.append(ToolStep(call, tool.label, ToolOutcome(CANCELLED), "cancelled"))
            continue
        answer = "yes" if session.consent.allowed(tool) else ask(tool, call)
        if answer == "always":
            session.consent.allow_always(tool)
        if answer == "no":
            steps.append(ToolStep(call, tool.label, ToolOutcome(DECLINED), "declined"))
            continue
        try:
            if on_run is None:
                outcome = session.manager.call(tool, call.arguments or {})
            else:
                with on_run(tool.label):
                    outcome = session.manager.call(tool, call.arguments or {})
        except KeyboardInterrupt:
            cancelled = True
            steps.append(ToolStep(call, tool.label, ToolOutcome(CANCELLED), "cancelled"))
            continue
        steps.append(ToolStep(call, tool.label, outcome, "ran"))
    return steps


def open_tool_session(spec: Any) -> ToolSession | None:
    """Read the MCP config the options name and start its servers in the background."""
    from qwen3_mlx.cli.user_config import mcp_log_dir
    from qwen3_mlx.mcp import read_mcp_config

    if spec.mcp_config is None or not spec.tools_enabled:
        return None
    servers = read_mcp_config(spec.mcp_config)
    manager = McpManager(servers, log_dir=mcp_log_dir())
    manager.start()
    return ToolSession(manager, Consent(spec.mcp_allow, yes=spec.yes), spec.max_tool_steps)


def terminal_asker() -> Callable[[str], str]:
    """A prompt_toolkit reader for consent answers: its own prompt, no line history."""
    from prompt_toolkit import PromptSession

    session: Any = PromptSession()

    def read(question: str) -> str:
        return session.prompt(question)

    return read
