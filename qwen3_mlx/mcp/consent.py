"""Which tool calls may run without asking: --yes, the config's allow-list, and `always` answers.

Patterns match the `server.tool` label with shell wildcards (`time.*`, `*`); nothing matches
unless the user named it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from qwen3_mlx.mcp.naming import McpTool


class Consent:
    """The standing permissions of one session."""

    def __init__(self, allow: Iterable[str] = (), *, yes: bool = False):
        self.patterns = [pattern.strip() for pattern in allow if pattern.strip()]
        self.yes = yes
        self.always: set[str] = set()

    def allowed(self, tool: McpTool) -> bool:
        """Whether a call to this tool may run without asking."""
        if self.yes or tool.label in self.always:
            return True
        return any(fnmatch.fnmatchcase(tool.label, pattern) for pattern in self.patterns)

    def allow_always(self, tool: McpTool) -> None:
        """Run this tool without asking for the rest of the session."""
        self.always.add(tool.label)
