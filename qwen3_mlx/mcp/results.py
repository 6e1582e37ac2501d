"""What an MCP tool returned, as the text the model reads back in its <tool_response>.

Text parts are passed on as written; the model cannot see images, audio or binary resources, so
those are summarised in one bracketed line (kind, MIME type, size). A result the server marks
`isError` stays an error: the text says so, and the front end shows it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from qwen3_mlx.tool_loop import ToolOutcome


def outcome_from_result(result: Any) -> ToolOutcome:
    """A ToolOutcome from an mcp CallToolResult (v2 field names)."""
    parts = [_part_text(part) for part in getattr(result, "content", None) or []]
    text = "\n\n".join(part for part in parts if part)
    structured = getattr(result, "structured_content", None)
    if not text and structured is not None:
        text = json.dumps(structured, ensure_ascii=False)
    is_error = bool(getattr(result, "is_error", False))
    if not text:
        text = "the tool failed and gave no message" if is_error else "(no output)"
    return ToolOutcome(text, is_error)


def _part_text(part: Any) -> str:
    kind = getattr(part, "type", None)
    if kind == "text":
        return part.text
    if kind in ("image", "audio"):
        return f"[{kind}: {part.mime_type}, {_size(_decoded_length(part.data))}, not shown to the model]"
    if kind == "resource":
        resource = part.resource
        if getattr(resource, "text", None) is not None:
            return resource.text
        length = _decoded_length(getattr(resource, "blob", "") or "")
        mime = getattr(resource, "mime_type", None) or "binary"
        return f"[resource {resource.uri}: {mime}, {_size(length)}, not shown to the model]"
    if kind == "resource_link":
        description = f" ({part.description})" if getattr(part, "description", None) else ""
        return f"[resource link: {part.name} {part.uri}{description}]"
    return f"[{kind or type(part).__name__} content, not shown to the model]"


def _decoded_length(data: str) -> int:
    try:
        return len(base64.b64decode(data, validate=False))
    except (ValueError, TypeError):
        return len(data)


def _size(length: int) -> str:
    if length < 1024:
        return f"{length} bytes"
    if length < 1024 * 1024:
        return f"{length / 1024:.1f} KiB"
    return f"{length / 1024 / 1024:.1f} MiB"
