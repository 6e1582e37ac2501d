"""Reading the chat REPL's input: prompt_toolkit on a terminal, plain lines from a pipe."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from qwen3_mlx.cli.commands import COMMANDS, completions

PROMPT = "› "
CONTINUATION = "… "
EMPTY_CTRL_C_HINT = "(Ctrl-D or /exit quits; Ctrl-C during a reply stops the reply)"

LineReader = Callable[[], str]  # returns the next message; raises EOFError at the end


def _completer() -> Any:
    from prompt_toolkit.completion import Completer, Completion

    class SlashCompleter(Completer):
        """Completes slash commands, /set names and /thinking show|hide."""

        def get_completions(self, document: Any, complete_event: Any) -> Iterable[Any]:
            before = document.text_before_cursor
            typed = before.rsplit(" ", 1)[-1] if " " in before else before
            for word in completions(before):
                meta = COMMANDS.get(word.lstrip("/"), ("", ""))[1] if word.startswith("/") else ""
                yield Completion(word, start_position=-len(typed), display_meta=meta)

    return SlashCompleter()


def _key_bindings() -> Any:
    from prompt_toolkit.application import run_in_terminal
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("escape", "enter")  # terminals send Alt+Enter as Esc, Enter
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    @bindings.add("c-c")
    def _interrupt(event: Any) -> None:
        # Ctrl-C at the prompt never quits: it clears a typed line, or explains how to leave.
        buffer = event.current_buffer
        if buffer.text:
            buffer.reset()
        else:
            run_in_terminal(lambda: print(EMPTY_CTRL_C_HINT))

    return bindings


def terminal_reader(history_file: Path) -> LineReader:
    """A prompt_toolkit line editor with persistent history, multi-line input and Tab completion."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.formatted_text import FormattedText
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.styles import Style

    try:
        history_file.parent.mkdir(parents=True, exist_ok=True)
        history: Any = FileHistory(str(history_file))
    except OSError:  # a read-only home should not stop the chat; history just does not persist
        history = InMemoryHistory()
    session: Any = PromptSession(
        history=history,
        completer=_completer(),
        complete_while_typing=False,
        key_bindings=_key_bindings(),
        style=Style.from_dict({"prompt": "ansicyan bold", "continuation": "ansibrightblack"}),
        enable_open_in_editor=False,
    )

    def read() -> str:
        return session.prompt(
            FormattedText([("class:prompt", PROMPT)]),
            prompt_continuation=lambda width, line_number, wrap_count: FormattedText(
                [("class:continuation", CONTINUATION.rjust(width))]
            ),
        )

    return read


def pipe_reader(stream: Any = None) -> LineReader:
    """One message per line from a non-terminal stdin (for scripted sessions)."""

    def read() -> str:
        line = (stream or sys.stdin).readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")

    return read
