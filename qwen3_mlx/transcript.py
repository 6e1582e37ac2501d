"""The JSON transcript format (save, validate, load), and checks of the paths it is written to.

The file holds the template's message list (plain OpenAI messages, readable by other tools) and,
per reply, a record of what the messages do not carry: thinking, how it ended, invalid calls.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3_mlx.errors import Qwen3Error, TranscriptError
from qwen3_mlx.events import FINISH_REASONS
from qwen3_mlx.history import Turn, history_messages
from qwen3_mlx.settings import validate_overrides
from qwen3_mlx.tools import ToolCall, ToolResult

TRANSCRIPT_FORMAT = "qwen3-mlx-transcript"
TRANSCRIPT_VERSION = 1


@dataclass
class TranscriptData:
    """What a transcript file holds."""

    model_id: str
    system: str | None
    thinking: bool
    explicit_settings: dict[str, Any]
    turns: list[Turn] = field(default_factory=list)


def write_transcript(path: str | Path, data: TranscriptData, settings: dict[str, Any]) -> None:
    """Write the transcript as JSON, atomically (a crash never leaves half a file)."""
    path = Path(path).expanduser()
    document = {
        "format": TRANSCRIPT_FORMAT,
        "version": TRANSCRIPT_VERSION,
        "model_id": data.model_id,
        "system": data.system,
        "thinking": data.thinking,
        "settings": settings,
        "explicit_settings": data.explicit_settings,
        "messages": history_messages(data.system, data.turns),
        "turns": [
            {
                "thinking": turn.thinking,
                "thinking_finished": turn.thinking_finished,
                "finish_reason": turn.finish_reason,
                "interrupted": turn.interrupted,
                "tool_calls": [
                    {"id": c.id, "name": c.name, "arguments": c.arguments_text, "error": c.error}
                    for c in turn.tool_calls
                ],
            }
            for turn in data.turns
        ],
    }
    text = json.dumps(document, ensure_ascii=False, indent=2) + "\n"
    mode = check_writable(path)
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=".transcript-", dir=path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        if mode is not None:
            os.chmod(temporary, mode)  # keep the mode of the file being replaced
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        raise TranscriptError(
            f"{path}: cannot write the transcript ({error.strerror or error})"
        ) from None
    finally:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)


def user_path(text: str | Path) -> Path:
    """A path a person typed, with ~ expanded; TranscriptError for one that cannot be a path."""
    if "\x00" in str(text):
        raise TranscriptError(f"{str(text)!r}: a path cannot hold a NUL character")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # expanduser: ~name of no such user, or no home folder
        user = str(text).split("/", 1)[0]
        raise TranscriptError(
            f"{text}: cannot expand {user} (no such user's home folder)"
        ) from None


def check_writable(path: Path) -> int | None:
    """Refuse a path a transcript cannot be written to; return the mode of an existing file.

    Checked before a reply is generated, so nobody waits for an answer that cannot be saved. A
    read-only file is refused rather than replaced (writing goes through a new file, which would
    otherwise take the place of a file the user protected).
    """
    folder = path.parent
    if not folder.is_dir():
        raise TranscriptError(f"{path}: cannot write the transcript (no folder {folder})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TranscriptError(f"{path}: cannot write the transcript (folder {folder} is read-only)")
    if path.is_dir():
        raise TranscriptError(f"{path}: cannot write the transcript there (it is a folder)")
    if not path.exists():
        return None
    mode = stat.S_IMODE(path.stat().st_mode)
    if not mode & stat.S_IWUSR or not os.access(path, os.W_OK):
        raise TranscriptError(f"{path}: the file is read-only; the transcript was not written")
    return mode


def read_transcript(path: str | Path) -> TranscriptData:
    """Read and validate a transcript; TranscriptError with one line if it is not a good one."""
    path = Path(path).expanduser()
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise TranscriptError(
            f"{path}: cannot read the transcript ({error.strerror or error})"
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TranscriptError(f"{path}: not a JSON transcript ({error})") from None
    try:
        return _parse(document)
    except TranscriptError as error:
        raise TranscriptError(f"{path}: {error}") from None
    except Qwen3Error as error:
        raise TranscriptError(f"{path}: bad settings ({error})") from None


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise TranscriptError(message)


def _parse(document: Any) -> TranscriptData:
    _require(isinstance(document, dict), "not a transcript (expected a JSON object)")
    _require(document.get("format") == TRANSCRIPT_FORMAT, f"not a {TRANSCRIPT_FORMAT} file")
    version = document.get("version")
    _require(isinstance(version, int), "transcript has no version number")
    _require(
        version <= TRANSCRIPT_VERSION,
        f"transcript version {version} is newer than this program reads ({TRANSCRIPT_VERSION})",
    )
    system = document.get("system")
    _require(system is None or isinstance(system, str), "'system' must be text or null")
    thinking = document.get("thinking", True)
    _require(isinstance(thinking, bool), "'thinking' must be true or false")
    model_id = document.get("model_id", "")
    _require(isinstance(model_id, str), "'model_id' must be text")
    explicit = document.get("explicit_settings", {})
    _require(isinstance(explicit, dict), "'explicit_settings' must be an object")
    messages = document.get("messages")
    _require(isinstance(messages, list), "'messages' must be a list")
    records = document.get("turns", [])
    _require(isinstance(records, list), "'turns' must be a list")
    turns = _parse_turns(messages, system, records)
    return TranscriptData(model_id, system, thinking, validate_overrides(explicit), turns)


def _parse_turns(messages: list[Any], system: str | None, records: list[Any]) -> list[Turn]:
    if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
        _require(messages[0].get("content") == system, "the system message differs from 'system'")
        messages = messages[1:]
    turns: list[Turn] = []
    position = 0
    for index, record in enumerate(records):
        _require(isinstance(record, dict), f"turn {index + 1} must be an object")
        user, results, position = _turn_input(messages, position)
        _require(
            position < len(messages) and _is_message(messages[position], "assistant"),
            f"message {position + 1} must be an assistant message with text content",
        )
        answer = messages[position]["content"]
        position += 1
        turns.append(_turn(index, record, user, answer, results))
    _require(position == len(messages), "'turns' must have one record per assistant message")
    return turns


def _is_message(message: Any, role: str) -> bool:
    return (
        isinstance(message, dict)
        and message.get("role") == role
        and isinstance(message.get("content"), str)
    )


def _turn_input(messages: list[Any], position: int) -> tuple[str | None, list[ToolResult], int]:
    """The user message, or the run of tool results, that starts at `position`."""
    if position < len(messages) and _is_message(messages[position], "user"):
        return messages[position]["content"], [], position + 1
    results = []
    while position < len(messages) and _is_message(messages[position], "tool"):
        message = messages[position]
        results.append(
            ToolResult(message["content"], message.get("tool_call_id"), message.get("name"))
        )
        position += 1
    _require(bool(results), f"message {position + 1} must be a user message with text content")
    return None, results, position


def _turn(
    index: int, record: dict, user: str | None, answer: str, results: list[ToolResult]
) -> Turn:
    reason = record.get("finish_reason", "stop")
    _require(reason in FINISH_REASONS, f"turn {index + 1} has an unknown finish_reason {reason!r}")
    thinking = record.get("thinking", "")
    finished = record.get("thinking_finished", True)
    _require(
        isinstance(thinking, str) and isinstance(finished, bool),
        f"turn {index + 1} has a malformed thinking record",
    )
    calls = record.get("tool_calls", [])
    _require(isinstance(calls, list), f"turn {index + 1}: 'tool_calls' must be a list")
    return Turn(
        user,
        answer,
        thinking,
        finished,
        reason,
        tuple(_call(index, call) for call in calls),
        tuple(results),
    )


def _call(index: int, record: Any) -> ToolCall:
    fields = ("id", "name", "arguments")
    _require(
        isinstance(record, dict) and all(isinstance(record.get(f), str) for f in fields),
        f"turn {index + 1} has a malformed tool call record",
    )
    error = record.get("error")
    arguments = None
    if error is None:
        try:
            arguments = json.loads(record["arguments"])
        except json.JSONDecodeError:
            _require(False, f"turn {index + 1}: tool call {record['id']} has invalid arguments")
    return ToolCall(record["id"], record["name"], record["arguments"], arguments, error)
