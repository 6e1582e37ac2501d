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


def _history(history_file: Path) -> Any:
    """File-backed line history that survives a file it cannot read or write.

    prompt_toolkit prints a traceback and waits for Enter on every line whose history cannot be
    stored (a file left root-owned by one sudo run); here the first failure is reported in one
    line and the history goes on in memory for the session.
    """
    from prompt_toolkit.history import FileHistory

    class ForgivingFileHistory(FileHistory):
        failed = False

        def _warn(self, error: OSError) -> None:
            if not self.failed:
                self.failed = True
                reason = error.strerror or error
                print(
                    f"Warning: line history {self.filename} cannot be used ({reason}); "
                    "it is kept in memory for this session",
                    file=sys.stderr,
                )

        def load_history_strings(self) -> Iterable[str]:
            try:
                yield from list(super().load_history_strings())
            except OSError as error:
                self._warn(error)

        def store_string(self, string: str) -> None:
            if self.failed:
                return
            try:
                super().store_string(string)
            except OSError as error:
                self._warn(error)

    try:
        history_file.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # reported by the first read or write
    return ForgivingFileHistory(str(history_file))


def terminal_reader(history_file: Path) -> LineReader:
    """A prompt_toolkit line editor with persistent history, multi-line input and Tab completion."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.formatted_text import FormattedText
    from prompt_toolkit.styles import Style

    session: Any = PromptSession(
        history=_history(history_file),
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
    """One message per line from a non-terminal stdin (for scripted sessions).

    Lines are read as bytes and decoded with surrogate escapes, so a line that is not UTF-8
    reaches the REPL (which repairs it and says so) instead of ending the session.
    """

    def read() -> str:
        source = stream or sys.stdin
        line = source.buffer.readline() if hasattr(source, "buffer") else source.readline()
        if not line:
            raise EOFError
        if isinstance(line, bytes):
            line = line.decode("utf-8", "surrogateescape")
        return line.rstrip("\n")

    return read
