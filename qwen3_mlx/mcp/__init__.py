"""MCP tools at the edge of the engine: config, one client per server, and consent rules.

Nothing here prints; the CLI shows what happens. The engine itself never starts a process.
"""

from qwen3_mlx.mcp.config import McpConfigError, ServerConfig, parse_mcp_config, read_mcp_config
from qwen3_mlx.mcp.consent import Consent
from qwen3_mlx.mcp.manager import McpManager
from qwen3_mlx.mcp.naming import McpTool
from qwen3_mlx.mcp.results import ToolOutcome

__all__ = [
    "Consent",
    "McpConfigError",
    "McpManager",
    "McpTool",
    "ServerConfig",
    "ToolOutcome",
    "parse_mcp_config",
    "read_mcp_config",
]
