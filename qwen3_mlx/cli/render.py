"""How replies look: live Markdown for the answer, dim thinking that folds to one line, stats."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.text import Text

from qwen3_mlx.events import AnswerText, ThinkingText, ToolCallEvent, TurnResult
from qwen3_mlx.settings import PRESET_NAMES, SETTINGS, Sampling

if TYPE_CHECKING:  # types only: importing chat loads mlx, and `--help` must not
    from qwen3_mlx.chat import Chat

PROGRESS_FROM_TOKENS = 2048  # shorter prompts read in a moment; a progress line would only flicker


def prefill_line(done: int, total: int, seconds: float) -> str:
    """The progress of a long prefill: tokens read of all, the rate and the time left."""
    rate = done / seconds if seconds > 0 else 0.0
    left = f" · ~{(total - done) / rate:.0f} s left" if rate > 0 else ""
    return f"reading the prompt: {done:,} of {total:,} tokens · {rate:,.0f} tok/s{left}"


class PrefillProgress:
    """`prompt`'s on_prefill hook: the progress line on stderr, redrawn in place.

    Only when a person watches (the stream is a terminal) and the prompt is long; the line is
    erased when the prefill ends, so the answer and a --show-thinking trace start clean.
    """

    def __init__(self, stream: Any):
        self.stream = stream
        self.started = time.perf_counter()
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == 0:  # each prefill reports 0 first
            self.started = now
        if total < PROGRESS_FROM_TOKENS or done == 0 or not self.stream.isatty():
            return
        if done >= total:
            self.clear()
            return
        self.stream.write("\r\x1b[2K" + prefill_line(done, total, now - self.started))
        self.stream.flush()
        self.shown = True

    def clear(self) -> None:
        """Erase the line if it is shown (the prefill ended, or was interrupted)."""
        if self.shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self.shown = False


class Tail:
    """Shows only the last lines of a renderable that fit the screen.

    A Live region taller than the terminal cannot be redrawn in place (rich would repeat it in the
    scrollback), so the streaming view keeps to the bottom of the text; the full answer is printed
    once the reply ends.
    """

    def __init__(self, renderable: RenderableType, reserve: int = 1):
        self.renderable = renderable
        self.reserve = reserve

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        height = max(console.size.height - self.reserve, 1)
        lines = console.render_lines(self.renderable, options.update(height=None), pad=False)
        for line in lines[-height:]:
            yield from line
            yield Segment.line()


def markdown_tail(text: str, max_chars: int) -> str:
    """The end of a Markdown text, cut at a paragraph break, with an open code fence reopened.

    The live view shows only the bottom of the answer; rendering just the end keeps each redraw
    cheap however long the answer grows (the whole answer is rendered once, at the end).
    """
    if len(text) <= max_chars:
        return text
    cut = text.find("\n\n", len(text) - max_chars)
    if cut < 0:
        return text
    fences = sum(1 for line in text[:cut].splitlines() if line.lstrip().startswith("```"))
    tail = text[cut + 2 :]
    return "```\n" + tail if fences % 2 else tail


def format_settings(settings: Sampling | Mapping[str, Any]) -> str:
    """`temp 0.6 · top_p 0.95 · …`; an unset seed and a zero penalty are left out."""
    parts = []
    for name, value in _by_name(settings).items():
        if value is None or (name in SETTINGS and value == SETTINGS[name].neutral):
            continue
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        label = SETTINGS[name].label if name in SETTINGS else name
        parts.append(f"{label} {shown}")
    return " · ".join(parts)


def _by_name(settings: Sampling | Mapping[str, Any]) -> Mapping[str, Any]:
    return settings.as_dict() if isinstance(settings, Sampling) else settings


def preset_summary(chat: Chat) -> str:
    """The sampling preset plus whatever was set explicitly (not every default)."""
    explicit = getattr(chat, "explicit_settings", {})
    values = _by_name(chat.settings)
    shown = {k: v for k, v in values.items() if k in PRESET_NAMES or k in explicit}
    return format_settings(shown)


def mode_name(thinking: bool) -> str:
    """The words for a thinking mode."""
    return "thinking on" if thinking else "thinking off"


def print_header(console: Console, chat: Chat, version: str, tools: str | None = None) -> None:
    """The banner: model, mode, context window, sampling preset, and the tools when there are any."""
    console.print(
        Text.assemble(
            ("qwen3-mlx ", "bold"), (version, "dim"), "  ", (chat.model_id or "model", "bold cyan")
        )
    )
    console.print(
        Text(
            f"{mode_name(chat.thinking)} · context {chat.context_limit:,} tokens · {preset_summary(chat)}",
            style="dim",
        )
    )
    if tools is not None:
        console.print(Text(f"tools: {tools} · /tools lists them", style="dim"))
    console.print(
        Text(
            "/help for commands · Alt+Enter new line · Ctrl-C stops a reply · Ctrl-D quits",
            style="dim",
        )
    )


def step_line(step: Any, width: int = 100) -> str:
    """One tool step folded to a line: `← server.tool: first line… (N chars)`."""
    from qwen3_mlx.visible import visible, visible_name

    label = visible_name(step.label)  # a server's text: shown, never obeyed by the terminal
    if step.status in ("declined", "cancelled"):
        return f"← {label}: {step.status}"
    text = " ".join(step.outcome.text.split())
    folded = text if len(text) <= width else text[: width - 1] + "…"
    mark = "✗" if step.outcome.is_error else "←"
    size = f" ({len(step.outcome.text):,} chars)" if len(text) > width else ""
    return f"{mark} {label}: {visible(folded)}{size}"


def stats_line(result: TurnResult) -> str:
    """The quiet line after a reply: tokens, time to first token, speed, and why it stopped early."""
    text = (
        f"{result.generated_tokens} tokens · {result.time_to_first_token:.2f} s to first token · "
        f"{result.decode_tokens_per_second:.1f} tok/s"
    )
    if result.finish_reason == "length":
        text += " · stopped at max_tokens"
    elif result.finish_reason == "repetition":
        text += " · stopped: the reply was repeating itself"
    return text


def speculation_text(result: TurnResult) -> str:
    """'12 of 20 drafted tokens accepted (60 %), 2.40 tokens per target step'."""
    return (
        f"{result.accepted_tokens} of {result.drafted_tokens} drafted tokens accepted "
        f"({100 * result.draft_acceptance:.0f} %), "
        f"{result.tokens_per_target_step:.2f} tokens per target step"
    )


def stats_lines(result: TurnResult) -> list[str]:
    """The /stats details of one reply."""
    speculation = (
        [f"speculation        {speculation_text(result)}"] if result.drafted_tokens else []
    )
    return [
        f"finish reason      {result.finish_reason}",
        f"prompt tokens      {result.prompt_tokens} ({result.prefilled_tokens} computed, "
        f"{result.prompt_tokens - result.prefilled_tokens} reused from the cache)",
        f"generated tokens   {result.generated_tokens}",
        f"first token after  {result.time_to_first_token:.2f} s",
        f"prefill speed      {result.prefill_tokens_per_second:.1f} tok/s",
        f"decode speed       {result.decode_tokens_per_second:.1f} tok/s",
        f"thinking time      {result.thinking_seconds:.1f} s",
        f"peak memory        {result.peak_memory_gb:.2f} GB",
        *speculation,
    ]


def thought_line(seconds: float, tokens: int, finished: bool = True) -> str:
    """The one line the thinking folds into."""
    unit = "token" if tokens == 1 else "tokens"
    return f"thought for {seconds:.1f} s, {tokens} {unit}" + ("" if finished else " (unfinished)")


class ReplyView:
    """Draws one streamed reply on a console; feed it events, then call finish()."""

    def __init__(self, console: Console, *, show_thinking: bool = False):
        self.console = console
        self.show_thinking = show_thinking
        self.live_mode = console.is_terminal
        self.thinking = ""
        self.thinking_tokens = 0
        self.answer = ""
        self.thinking_started: float | None = None
        self.thinking_closed = False
        self.live: Live | None = None
        self.next_draw = 0.0
        self.prefill_started: float | None = None

    def prefill_progress(self, done: int, total: int) -> None:
        """Chat's on_prefill hook: a long prompt shows tokens read, the rate and the time left."""
        now = time.perf_counter()
        if self.prefill_started is None or done == 0:  # each prefill reports 0 first
            self.prefill_started = now
        if self.live is None or total < PROGRESS_FROM_TOKENS or done == 0:
            return
        text = prefill_line(done, total, now - self.prefill_started)
        self.live.update(Text(text, style="dim"), refresh=True)

    def __enter__(self) -> ReplyView:
        if self.live_mode:
            # A dim ellipsis until the first token: the prompt is being read (prefill).
            self.live = Live(
                Text("…", style="dim"), console=self.console, transient=True, auto_refresh=False
            )
            self.live.start(refresh=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop_live()

    def _window_chars(self) -> int:
        # A screen shows at most width x height characters; twice that covers Markdown markup
        # (link targets, emphasis marks) that takes no room once rendered.
        return 2 * self.console.size.width * self.console.size.height

    def _draw(self, make: Any) -> None:
        """Redraw the live region, at most 10 times a second and never more than ~20% of the time.

        Rendering Markdown costs milliseconds per kilobyte, and it shares the CPU with the model.
        """
        if self.live is None:
            return
        now = time.perf_counter()
        if now < self.next_draw:
            return
        self.live.update(make(), refresh=True)
        cost = time.perf_counter() - now
        self.next_draw = now + max(0.1, 5 * cost)

    def _stop_live(self) -> None:
        if self.live is not None:
            self.live.update(Text(""), refresh=True)
            self.live.stop()
            self.live = None

    def feed(self, event: Any) -> None:
        """Show one stream event."""
        if isinstance(event, ToolCallEvent):
            self._close_thinking(finished=True)
            call = event.call
            style = "cyan" if call.valid else "bold red"
            line = Text(f"→ {call.describe()}" if call.valid else f"⚠ {call.describe()}", style)
            if self.live is not None:
                self.live.console.print(line, highlight=False)
            else:
                self.console.print(line, highlight=False)
        elif isinstance(event, ThinkingText):
            self.thinking_tokens = max(self.thinking_tokens, event.tokens)
            self._on_thinking(event.text)
        elif isinstance(event, AnswerText):
            self._close_thinking(finished=True)
            self.answer += event.text
            if self.live is not None:
                self._draw(lambda: Tail(Markdown(markdown_tail(self.answer, self._window_chars()))))
            else:
                self.console.file.write(event.text)
                self.console.file.flush()

    def _on_thinking(self, text: str) -> None:
        if self.thinking_started is None:
            self.thinking_started = time.perf_counter()
        self.thinking += text
        if self.live is not None:
            self._draw(
                lambda: Tail(Text(self.thinking[-self._window_chars() :].strip(), style="dim"))
            )
        elif self.show_thinking:
            self.console.file.write(text)
            self.console.file.flush()

    def _close_thinking(self, finished: bool) -> None:
        if self.thinking_closed:
            return
        self.thinking_closed = True
        if not self.thinking.strip():
            return
        seconds = time.perf_counter() - (self.thinking_started or time.perf_counter())
        line = Text(thought_line(seconds, self.thinking_tokens, finished), style="dim italic")
        if self.live_mode:
            if self.live is not None:
                self.live.update(Text(""))
            if self.show_thinking:
                self.console.print(Text(self.thinking.strip(), style="dim"))
            self.console.print(line)
        else:
            if self.show_thinking:
                self.console.file.write("\n")
            self.console.print(line, highlight=False)

    def finish(self, result: TurnResult | None) -> None:
        """Close the live view, print the whole answer and the stats line.

        Every piece of text has been fed by now (a closed Reply yields what it held back), so
        the view's own text is the reply's text.
        """
        if result is not None:
            self.thinking_tokens = result.thinking_tokens
        self._close_thinking(finished=result.thinking_finished if result is not None else False)
        if self.live_mode:
            self._stop_live()
            if self.answer.strip():
                self.console.print(Markdown(self.answer))
        elif self.answer and not self.answer.endswith("\n"):
            self.console.file.write("\n")
        if result is None:
            return
        if result.finish_reason == "interrupted":
            self.console.print(
                Text("⏹ interrupted: the partial answer is kept", style="yellow"), highlight=False
            )
        self.console.print(Text(stats_line(result), style="dim"), highlight=False)
