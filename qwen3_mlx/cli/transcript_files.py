"""File names and the Markdown copy that go with a saved chat transcript."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen3_mlx.errors import TranscriptError

if TYPE_CHECKING:  # types only: importing chat loads mlx, and `--help` must not
    from qwen3_mlx.chat import Chat


def default_save_path(now: time.struct_time, folder: Path | None = None) -> Path:
    """qwen3-chat-YYYYMMDD-HHMMSS.json in the current folder."""
    return (folder or Path.cwd()) / time.strftime("qwen3-chat-%Y%m%d-%H%M%S.json", now)


def save_paths(path: Path) -> tuple[Path, Path]:
    """The JSON transcript and its Markdown copy for a /save name; the two never coincide.

    `conv.md` saves conv.json plus conv.md; a name without a suffix gets `.json`.
    """
    if path.suffix.lower() == ".md":
        return path.with_suffix(".json"), path
    if not path.suffix:
        path = path.with_name(path.name + ".json")
    return path, path.with_suffix(".md")


def load_path(path: Path) -> Path:
    """The transcript to read for a /load name: the Markdown copy's name means its JSON file."""
    if path.suffix.lower() == ".md" and path.with_suffix(".json").is_file():
        return path.with_suffix(".json")
    return path


def transcript_markdown(system: str | None, turns: list[Any], model_id: str = "") -> str:
    """The conversation as Markdown for people: each reasoning folded in a <details> block."""
    lines = [f"# Chat with {model_id}" if model_id else "# Chat", ""]
    if system:
        lines += ["## System", "", system.strip(), ""]
    for turn in turns:
        if turn.user is not None:
            lines += ["## You", "", turn.user.strip(), ""]
        for result in turn.tool_results:  # a reply inside a tool loop answers these
            lines += ["## Tool result", "", "```", result.content.strip(), "```", ""]
        lines += ["## Assistant", ""]
        if turn.thinking.strip():
            lines += [
                "<details><summary>Thinking</summary>",
                "",
                turn.thinking.strip(),
                "",
                "</details>",
                "",
            ]
        lines += [turn.answer.strip(), ""]
        lines += [f"Tool call: `{call.describe()}`" for call in turn.tool_calls]
        lines += [""] if turn.tool_calls else []
        if turn.finish_reason == "interrupted":
            lines += ["*(interrupted)*", ""]
    return "\n".join(lines)


def write_markdown_copy(chat: Chat, path: Path) -> Path:
    """Write the conversation's Markdown copy to path; return it."""
    try:
        path.write_text(
            transcript_markdown(chat.system, chat.turns, chat.model_id), encoding="utf-8"
        )
    except OSError as error:
        raise TranscriptError(f"{path}: cannot be written ({error.strerror})") from None
    return path
