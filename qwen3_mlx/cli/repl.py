"""The chat REPL: a thin view over Chat. It reads lines, runs slash commands and draws replies."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from qwen3_mlx.cli.commands import Action, help_text, parse_line
from qwen3_mlx.cli.line_input import LineReader
from qwen3_mlx.cli.render import ReplyView, format_settings, mode_name, preset_summary, stats_lines
from qwen3_mlx.cli.transcript_files import (
    default_save_path,
    load_path,
    save_paths,
    write_markdown_copy,
)
from qwen3_mlx.errors import ContextOverflowError, Qwen3Error
from qwen3_mlx.events import TurnResult
from qwen3_mlx.sizes import format_size
from qwen3_mlx.transcript import user_path
from qwen3_mlx.visible import visible, visible_name

if TYPE_CHECKING:
    from qwen3_mlx.chat import Chat
    from qwen3_mlx.cli.tool_steps import ToolSession
    from qwen3_mlx.mcp import McpTool
    from qwen3_mlx.reply import Reply
    from qwen3_mlx.tool_loop import ToolStep
    from qwen3_mlx.tools import ToolCall


class Repl:
    """Runs one interactive session over a Chat; knows nothing of the model.

    No error ends the session: each is reported in one line and the conversation is kept.
    """

    def __init__(
        self,
        chat: Chat,
        console: Console,
        read_line: LineReader,
        *,
        show_thinking: bool = False,
        tools: ToolSession | None = None,
        ask_line: Callable[[str], str] | None = None,
    ):
        self.chat = chat
        self.console = console
        self.read_line = read_line
        self.show_thinking = show_thinking
        self.last_result: TurnResult | None = None
        self.tools = tools
        # Reads a consent answer; by default the question is printed and the next line read.
        self.ask_line = ask_line

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
                if not self.handle(parse_line(self.valid_text(line))):
                    return
            except KeyboardInterrupt:
                self.note("interrupted", style="yellow")
            except Exception as error:  # noqa: BLE001 (nothing may end the chat and lose it)
                self.report(error)

    def valid_text(self, line: str) -> str:
        """The line with bytes that were not UTF-8 (surrogate escapes) replaced by U+FFFD."""
        fixed = line.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        if fixed != line:
            self.note("the line was not valid UTF-8: its bad bytes are shown as �", style="yellow")
        return fixed

    def report(self, error: Exception) -> None:
        """One line for an error, with the REPL's own ways out where there are some."""
        if isinstance(error, ContextOverflowError):
            ways = "/undo drops the last exchange, /reset starts over"
            if not error.yarn_enabled:
                ways += ", or restart with --rope-scaling yarn --rope-factor 4 for 4x the context"
            message = f"{error}: {ways}"
        elif isinstance(error, Qwen3Error):
            message = str(error)
        else:
            message = f"{type(error).__name__}: {error}"
        self.note(f"Error: {' '.join(message.split())}", style="red")

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
            self.converse(lambda: self.chat.send(action.text))
            return True
        if action.name == "exit":
            return False
        getattr(self, f"do_{action.name}")(action)
        return True

    def stream(self, start: Callable[[], Reply]) -> TurnResult | None:
        """Draw a reply as it streams; Ctrl-C stops the reply and keeps the session usable."""
        view = ReplyView(self.console, show_thinking=self.show_thinking)
        reply: Reply | None = None
        error: Exception | None = None
        interrupted = False
        self.chat.on_prefill = view.prefill_progress  # a long prompt shows its progress
        self.chat.on_notice = self.note  # e.g. --rope-scaling auto moving to YaRN
        try:
            with view:
                reply = start()
                for event in reply:
                    view.feed(event)
        except KeyboardInterrupt:
            interrupted = True
        except Exception as caught:  # noqa: BLE001 (re-raised once the view is finished)
            error = caught
        if reply is not None:
            reply.close()  # a no-op for a finished reply; records an interrupted one
            for event in reply:  # the text held back when it stopped
                view.feed(event)
            view.finish(reply.result)
            self.last_result = reply.result
        if error is not None:
            raise error
        result = reply.result if reply is not None else None
        if interrupted and (result is None or result.finish_reason != "interrupted"):
            self.note("⏹ interrupted", style="yellow")
        return result

    def converse(self, start: Callable[[], Reply]) -> TurnResult | None:
        """Stream a reply, then let the tool loop run its calls (with consent) and stream the
        next, until the model answers without a call or the step limit is reached."""
        result = self.stream(start)
        if self.tools is None:
            return result  # no tools: the model's text is never parsed as a call
        loop = self.tools.loop(self.ask_consent, self.show_step, self._running)
        end = loop.chain(self.chat, result, self.stream, enabled=self.tools.enabled)
        if end.tools_off:
            self.note("tools are off: the call was not run (/tools on)", style="yellow")
        if end.out_of_steps:
            self.note(
                f"stopped after {len(end.rounds)} tool steps (--max-tool-steps "
                f"{loop.max_steps}); send a message to go on",
                style="yellow",
            )
        return end.result

    def ask_consent(self, tool: McpTool, call: ToolCall) -> str:
        """`server.tool(args) [y]es / [n]o / [a]lways for this tool`; end of input or Ctrl-C: no.

        With no terminal to ask (ask_line None: stdin is a pipe), nothing piped in is taken for
        an answer: the call is declined unless --yes or mcp_allow let it run unasked.
        """
        from qwen3_mlx.tool_loop import ask_consent, consent_question, shown_call

        if self.ask_line is None:
            self.note(
                f"tool call {shown_call(tool.label, call)} declined: stdin is not a terminal, so "
                "chat runs tools only with --yes or when mcp_allow in config.toml names them",
                style="yellow",
            )
            return "no"
        ask_line = self.ask_line

        def read(question: str) -> str | None:
            try:
                return ask_line(question)
            except (EOFError, KeyboardInterrupt):
                return None

        question = consent_question(tool.label, call)
        return ask_consent(question, read, lambda line: self.note(line, style="yellow"))

    def _running(self, label: str) -> Any:
        from contextlib import nullcontext

        if not self.console.is_terminal:
            return nullcontext()
        return self.console.status(
            f"running {visible_name(label)}… (Ctrl-C cancels the call)", spinner="dots"
        )

    def show_step(self, step: ToolStep) -> None:
        """The outcome of one call, folded to one line unless /thinking show."""
        from qwen3_mlx.cli.render import step_line

        style = "red" if step.outcome.is_error else "dim"
        if step.status in ("declined", "cancelled"):
            style = "yellow"
        if self.show_thinking and step.status == "ran":
            self.console.print(Text(f"← {visible_name(step.label)}:", style=style), highlight=False)
            self.console.print(Text(visible(step.outcome.text), style=style), highlight=False)
        else:
            self.console.print(Text(step_line(step), style=style), highlight=False)
        if step.cut_note():
            self.note(f"Warning: {step.cut_note()}", style="yellow")

    def do_tools(self, action: Action) -> None:
        """/tools [off|on]: list the MCP tools, or switch them."""
        if self.tools is None:
            self.note("no MCP tools: give --mcp-config FILE, or set mcp_config in config.toml")
            return
        if action.argument in ("on", "off"):
            self.tools.switch(self.chat, action.argument == "on")
            self.note(f"tools {action.argument}: {self.tools.summary()}")
            return
        self.note(self.tools.summary(), style="")
        for tool in self.tools.manager.tools:
            allowed = "  (runs without asking)" if self.tools.consent.allowed(tool) else ""
            line = Text.assemble(("  " + visible_name(tool.label), "cyan"), allowed)
            self.console.print(line, highlight=False)
            if tool.description:
                description = visible(" ".join(tool.description.split()))
                self.console.print(Text("    " + description, style="dim"), highlight=False)
        for problem in self.tools.problems:
            self.note(problem, style="yellow")

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
        self.converse(self.chat.retry)

    def do_save(self, action: Action) -> None:
        """/save [file] [--with-cache]: JSON transcript plus a Markdown copy (never the same file),
        and with --with-cache the KV cache beside them, so /load resumes without a prefill."""
        words = action.argument.split()
        with_cache = "--with-cache" in words
        name = " ".join(word for word in words if word != "--with-cache")
        given = user_path(name) if name else None
        path, markdown = save_paths(given or default_save_path(time.localtime()))
        size = self.chat.save(path, with_cache=with_cache)
        write_markdown_copy(self.chat, markdown)
        cache = f", KV cache {format_size(size)}" if size is not None else ""
        self.note(f"saved {path} (and {markdown.name}{cache})")

    def do_load(self, action: Action) -> None:
        """/load file: continue a saved conversation (its Markdown copy's name works too)."""
        self.load(load_path(user_path(action.argument)))

    def load(self, path: Path) -> None:
        """Continue the conversation saved at path, and say what was restored."""
        cache_note = self.chat.load(path)
        if cache_note:
            self.note(cache_note, style="dim" if cache_note.startswith("restored") else "yellow")
        # The replies of a tool loop answer tool results, not the user: one exchange in all.
        turns = sum(turn.user is not None for turn in self.chat.turns)
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
        line = f"{used:,} of {limit:,} tokens used ({100 * used / max(limit, 1):.1f}%)"
        per_token = getattr(self.chat, "kv_bytes_per_token", None)
        if per_token:
            line += f" · KV cache {format_size(per_token)} per token"
            fit = self.chat.tokens_that_fit()
            if fit is not None:
                line += f", about {fit:,} more fit in free memory"
        self.note(line, style="")

    def do_stats(self, action: Action) -> None:
        """/stats: details of the last reply."""
        result = self.last_result
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
