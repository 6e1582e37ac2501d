"""Which tool calls may run without asking: --yes, the config's allow-list, and `always` answers.

An allow-list entry is `server/tool`, each side a shell wildcard pattern (`time/*`, `files/read*`,
`*/*`); it splits at the last `/`, as MCP tool names hold no `/`. The older `server.tool` form
still works where it can be read one way only: when exactly one configured server's name is a
prefix of it before a dot, or when it names no server (`*`, `*.read`: matched against the whole
`server.tool` label). `files.read.*` with both a `files` and a `files.read` server is ambiguous:
it allows nothing, and the session says so. Nothing matches unless the user named it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from qwen3_mlx.mcp.naming import McpTool


class Consent:
    """The standing permissions of one session (servers: the configured servers' names)."""

    def __init__(
        self, allow: Iterable[str] = (), *, yes: bool = False, servers: Iterable[str] = ()
    ):
        self.yes = yes
        self.always: set[str] = set()
        self.rules: list[tuple[str, str]] = []  # (server pattern, tool pattern)
        self.label_patterns: list[str] = []  # old entries that name no configured server
        self.problems: list[str] = []
        names = list(servers)
        for entry in (entry.strip() for entry in allow):
            if entry:
                self._add(entry, names)

    def _add(self, entry: str, servers: list[str]) -> None:
        if "/" in entry:
            server, _, tool = entry.rpartition("/")
            self.rules.append((server, tool))
            return
        owners = [name for name in servers if entry.startswith(name + ".")]
        if len(owners) == 1:
            self.rules.append((owners[0], entry[len(owners[0]) + 1 :]))
        elif not owners:
            self.label_patterns.append(entry)
        else:
            readings = " or ".join(f"'{name}/{entry[len(name) + 1 :]}'" for name in owners)
            self.problems.append(
                f"mcp_allow entry {entry!r} allows nothing: it could name tools of the servers "
                f"{', '.join(map(repr, owners))}; write {readings}"
            )

    def allowed(self, tool: McpTool) -> bool:
        """Whether a call to this tool may run without asking."""
        if self.yes or tool.label in self.always:
            return True
        if any(
            fnmatch.fnmatchcase(tool.server, server) and fnmatch.fnmatchcase(tool.name, name)
            for server, name in self.rules
        ):
            return True
        return any(fnmatch.fnmatchcase(tool.label, pattern) for pattern in self.label_patterns)

    def allow_always(self, tool: McpTool) -> None:
        """Run this tool without asking for the rest of the session."""
        self.always.add(tool.label)
