"""The tools of MCP servers as the model sees them: OpenAI functions with unique, valid names.

The model gets `server-tool` (Qwen-Agent's convention, so Qwen3 sees what it was tuned with),
reduced to the characters OpenAI allows in a function name (letters, digits, `_`, `-`; at most
64); the person at the keyboard sees `server.tool`. The server's full inputSchema is kept.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MAX_NAME = 64


@dataclass(frozen=True)
class McpTool:
    """One tool of one server."""

    server: str
    name: str
    description: str
    input_schema: dict[str, Any] = field(default_factory=dict)
    function_name: str = ""  # the name the model calls it by

    @property
    def label(self) -> str:
        """`server.tool`, the name a person sees and the allow-list matches."""
        return f"{self.server}.{self.name}"

    def function(self) -> dict[str, Any]:
        """The tool in OpenAI's function format, for Chat(tools=...)."""
        schema = dict(self.input_schema) or {"type": "object", "properties": {}}
        return {
            "type": "function",
            "function": {
                "name": self.function_name,
                "description": self.description,
                "parameters": schema,
            },
        }


def function_name(server: str, tool: str) -> str:
    """`server-tool` with every character OpenAI refuses made `_`, cut to 64 with a hash."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", f"{server}-{tool}")
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9]}_{digest}"
    return name


def named_tools(tools: Iterable[McpTool]) -> list[McpTool]:
    """The tools with unique function names (a clash after cleaning gets `_2`, `_3`, ...)."""
    taken: set[str] = set()
    named = []
    for tool in tools:
        base = function_name(tool.server, tool.name)
        name, number = base, 1
        while name in taken:
            number += 1
            name = f"{base[: MAX_NAME - len(str(number)) - 1]}_{number}"
        taken.add(name)
        named.append(
            McpTool(tool.server, tool.name, tool.description, tool.input_schema, function_name=name)
        )
    return named


def find_tool(tools: Iterable[McpTool], name: str) -> McpTool | None:
    """The tool a call names: by its function name, else by its bare MCP name when one server has it.

    Small models (the tiny test model among them) sometimes drop the `server-` prefix they were
    shown; when only one server has a tool of that name, the call is not ambiguous.
    """
    tools = list(tools)
    exact = next((tool for tool in tools if tool.function_name == name), None)
    if exact is not None:
        return exact
    bare = [tool for tool in tools if tool.name == name]
    return bare[0] if len(bare) == 1 else None
