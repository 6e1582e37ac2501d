"""The chat REPL: a thin view over Chat. It reads lines, runs slash commands and draws replies."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from qwen3_mlx.cli.commands import Action, help_text, parse_line
from qwen3_mlx.cli.line_input import LineReader
from qwen3_mlx.cli.render import ReplyView, format_settings, mode_name, preset_summary, stats_lines
from qwen3_mlx.cli.transcript_files import default_save_path, write_markdown_copy
from qwen3_mlx.errors import Qwen3Error
from qwen3_mlx.events import TurnResult


class Repl:
    """Runs one interactive session over a Chat; knows nothing of the model."""

    def __init__(
        self, chat: Any, console: Console, read_line: LineReader, *, show_thinking: bool = False
    ):
        self.chat = chat
        self.console = console
        self.read_line = read_line
        self.show_thinking = show_thinking

    def run(self) -> None:
        """Read and handle lines until /exit or end of input (Ctrl-D)."""
        while True:
            try:
                line = self.read_line()
            except EOFError:
                return
            except KeyboardInterrupt:
                continue
            try:
                if not self.handle(parse_line(line)):
                    return
            except KeyboardInterrupt:
                self.note("interrupted", style="yellow")
            except Qwen3Error as error:
                self.note(f"Error: {error}", style="red")

    def count_tokens(self, text: str) -> int:
        """Tokens of a text, for the folded thinking line."""
        tokenizer = getattr(self.chat, "tokenizer", None)
        return len(tokenizer.encode(text)) if tokenizer is not None else 0

    def note(self, text: str, style: str = "dim") -> None:
        """A line of feedback from the REPL itself."""
        self.console.print(Text(text, style=style), highlight=False)

    def handle(self, action: Action) -> bool:
        """Carry out one action; False means leave the REPL."""
        if action.kind == "nothing":
            return True
        if action.kind == "hint":
            self.note(action.text, style="yellow")
            return True
        if action.kind == "send":
            self.stream(lambda: self.chat.send(action.text))
            return True
        if action.name == "exit":
            return False
        getattr(self, f"do_{action.name}")(action)
        return True

    def stream(self, start: Any) -> TurnResult | None:
        """Draw a reply as it streams; Ctrl-C stops the reply and keeps the session usable."""
        before = self.chat.last_result
        result: TurnResult | None = None
        interrupted = False
        view = ReplyView(
            self.console, show_thinking=self.show_thinking, count_tokens=self.count_tokens
        )
        events: Iterator[Any] | None = None
        try:
            with view:
                events = start()
                for event in events:
                    if isinstance(event, TurnResult):
                        result = event
                    else:
                        view.feed(event)
        except KeyboardInterrupt:
            interrupted = True
            if events is not None:
                events.close()  # lets Chat record the partial answer, marked interrupted
            latest = self.chat.last_result
            result = latest if latest is not before else None
        except Qwen3Error:
            latest = self.chat.last_result
            view.finish(latest if latest is not before else None)  # keep what was shown
            raise
        view.finish(result)
        if interrupted and (result is None or result.finish_reason != "interrupted"):
            self.note("⏹ interrupted", style="yellow")
        return result

    def do_help(self, action: Action) -> None:
        """/help: the commands."""
        self.console.print(Text(help_text()), highlight=False)

    def _set_thinking(self, on: bool) -> None:
        # The Chat switches the sampling preset with the mode; show the settings now in force.
        self.chat.thinking = on
        self.note(f"{mode_name(on)} · {preset_summary(self.chat)}")

    def do_think(self, action: Action) -> None:
        """/think: thinking on."""
        self._set_thinking(True)

    def do_no_think(self, action: Action) -> None:
        """/no_think: thinking off."""
        self._set_thinking(False)

    def do_system(self, action: Action) -> None:
        """/system [text|none]: show, set or clear the system prompt."""
        if not action.argument:
            self.note(
                f"system prompt: {self.chat.system}" if self.chat.system else "no system prompt"
            )
            return
        self.chat.system = None if action.argument.lower() == "none" else action.argument
        self.note("system prompt cleared" if self.chat.system is None else "system prompt set")

    def do_reset(self, action: Action) -> None:
        """/reset: forget the conversation."""
        self.chat.reset()
        self.note("conversation cleared")

    def do_undo(self, action: Action) -> None:
        """/undo: drop the last exchange."""
        self.chat.undo()
        self.note("last exchange removed")

    def do_retry(self, action: Action) -> None:
        """/retry: a new answer to the last question."""
        self.stream(self.chat.retry)

    def do_save(self, action: Action) -> None:
        """/save [file]: JSON transcript plus a Markdown copy."""
        path = (
            Path(action.argument).expanduser()
            if action.argument
            else default_save_path(time.localtime())
        )
        self.chat.save(path)
        markdown = write_markdown_copy(self.chat, path)
        self.note(f"saved {path} (and {markdown.name})")

    def do_load(self, action: Action) -> None:
        """/load file: continue a saved conversation."""
        path = Path(action.argument).expanduser()
        self.chat.load(path)
        turns = len(self.chat.turns)
        self.note(
            f"loaded {path}: {turns} exchange{'s' if turns != 1 else ''} · {mode_name(self.chat.thinking)}"
        )

    def do_set(self, action: Action) -> None:
        """/set name value: an explicit sampling value."""
        self.chat.set(action.argument, action.value)
        self.note(format_settings(self.chat.settings))

    def do_unset(self, action: Action) -> None:
        """/set name default: back to the preset."""
        self.chat.unset(action.argument)
        self.note(format_settings(self.chat.settings))

    def do_settings(self, action: Action) -> None:
        """/settings: the sampling settings in use."""
        self.note(
            f"{mode_name(self.chat.thinking)} · {format_settings(self.chat.settings)}", style=""
        )

    def do_context(self, action: Action) -> None:
        """/context: tokens used of the window."""
        used, limit = self.chat.context_used, self.chat.context_limit
        self.note(
            f"{used:,} of {limit:,} tokens used ({100 * used / max(limit, 1):.1f}%)", style=""
        )

    def do_stats(self, action: Action) -> None:
        """/stats: details of the last reply."""
        result = self.chat.last_result
        if result is None:
            self.note("no reply yet")
            return
        self.console.print(Text("\n".join(stats_lines(result))), highlight=False)

    def do_thinking(self, action: Action) -> None:
        """/thinking show|hide: how the reasoning is drawn."""
        self.show_thinking = action.argument == "show"
        self.note(
            "thinking will be shown in full"
            if self.show_thinking
            else "thinking will fold to one line"
        )
