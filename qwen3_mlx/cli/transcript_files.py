"""File names and the Markdown copy that go with a saved chat transcript."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from qwen3_mlx.errors import TranscriptError

ROLE_TITLES = {"system": "System", "user": "You", "assistant": "Assistant", "tool": "Tool"}


def default_save_path(now: time.struct_time, folder: Path | None = None) -> Path:
    """qwen3-chat-YYYYMMDD-HHMMSS.json in the current folder."""
    return (folder or Path.cwd()) / time.strftime("qwen3-chat-%Y%m%d-%H%M%S.json", now)


def transcript_markdown(messages: list[dict[str, Any]], model_id: str = "") -> str:
    """The conversation as Markdown: one heading per message, the text as written."""
    lines = [f"# Chat with {model_id}" if model_id else "# Chat", ""]
    for message in messages:
        title = ROLE_TITLES.get(message.get("role", ""), str(message.get("role", "")).title())
        lines += [f"## {title}", "", str(message.get("content", "")).strip(), ""]
    return "\n".join(lines)


def write_markdown_copy(chat: Any, json_path: Path) -> Path:
    """Write the Markdown copy next to a saved JSON transcript; return its path."""
    path = json_path.with_suffix(".md")
    try:
        path.write_text(transcript_markdown(list(chat.messages), chat.model_id), encoding="utf-8")
    except OSError as error:
        raise TranscriptError(f"{path}: cannot be written ({error.strerror})") from None
    return path
