"""The REPL over a scripted fake Chat: commands reach the Chat, replies render, Ctrl-C keeps the session."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from qwen3_mlx.cli.commands import parse_line
from qwen3_mlx.cli.render import ReplyView, format_settings, stats_line, thought_line
from qwen3_mlx.cli.repl import Repl
from qwen3_mlx.errors import HistoryError
from qwen3_mlx.events import AnswerText, ThinkingText, TurnResult
from qwen3_mlx.history import Turn
from qwen3_mlx.settings import setting_name, validate_setting


def make_result(
    answer: str, thinking: str = "", finish: str = "stop", generated: int = 7
) -> TurnResult:
    return TurnResult(
        finish_reason=finish,
        answer=answer,
        thinking=thinking,
        thinking_finished=finish != "interrupted",
        prompt_tokens=12,
        prefilled_tokens=5,
        generated_tokens=generated,
        thinking_tokens=len(thinking.split()),
        time_to_first_token=0.25,
        prefill_tokens_per_second=100.0,
        decode_tokens_per_second=42.5,
        thinking_seconds=0.5,
        peak_memory_gb=0.1,
    )


class FakeReply:
    """The Reply contract over scripted pieces: iterate for text, then `result`; close() records
    the reply as interrupted. With chat.hold_back, the answer piece in flight when it stopped is
    held back (as the detokenizer holds half a character) and comes out after close()."""

    def __init__(self, chat: FakeChat, user: str, thinking: str, answer: str):
        words = thinking.split()
        self.pieces = [ThinkingText(w + " ", i + 1) for i, w in enumerate(words)] + [
            AnswerText(w + " ") for w in answer.split()
        ]
        self.chat, self.user, self.thinking = chat, user, thinking
        self.index = 0
        self.held: list[Any] = []
        self.result: TurnResult | None = None

    def __iter__(self) -> Iterator[Any]:
        if self.result is not None:
            held, self.held = self.held, []
            yield from held
            return
        try:
            while self.index < len(self.pieces):
                if self.index == self.chat.interrupt_after:
                    self.chat.interrupt_after = None
                    raise KeyboardInterrupt
                self.index += 1
                yield self.pieces[self.index - 1]
        except BaseException:
            self.close()
            raise
        self._end("stop")

    def close(self) -> None:
        if self.result is None:
            following = self.pieces[self.index : self.index + int(self.chat.hold_back)]
            self.held = [p for p in following if isinstance(p, AnswerText)]
            self.index += len(self.held)
            self._end("interrupted")

    def _end(self, finish: str) -> None:
        shown = "".join(p.text for p in self.pieces[: self.index] if isinstance(p, AnswerText))
        self.chat.turns.append(
            Turn(self.user, shown.strip(), self.thinking.strip(), finish != "interrupted", finish)
        )
        self.result = self.chat.last_result = make_result(shown.strip(), self.thinking, finish)


class FakeChat:
    """Scripted replies; records what the REPL asks of it. `interrupt_after` pieces raises Ctrl-C."""

    def __init__(
        self, replies: list[tuple[str, str]] | None = None, interrupt_after: int | None = None
    ):
        self.replies = list(replies or [("", "Four.")])
        self.interrupt_after = interrupt_after
        self.hold_back = False
        self.model_id = "fake/model"
        self.system: str | None = None
        self.thinking = True
        self.sent: list[str] = []
        self.calls: list[tuple[str, Any]] = []
        self.last_result: TurnResult | None = None
        self.turns: list[Turn] = []
        self.context_limit = 4096
        self.context_used = 123
        self.explicit: dict[str, Any] = {}

    @property
    def settings(self) -> dict[str, Any]:
        preset = (
            {"temperature": 0.6, "top_p": 0.95}
            if self.thinking
            else {"temperature": 0.7, "top_p": 0.8}
        )
        return {**preset, **self.explicit}

    @property
    def messages(self) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for turn in self.turns:
            out += [
                {"role": "user", "content": turn.user},
                {"role": "assistant", "content": turn.answer},
            ]
        return out

    def send(self, text: str) -> FakeReply:
        self.sent.append(text)
        return self._reply(text)

    def retry(self) -> FakeReply:
        if not self.turns:
            raise HistoryError("nothing to retry")
        user = self.turns.pop().user
        self.calls.append(("retry", user))
        return self._reply(user)

    def _reply(self, user: str) -> FakeReply:
        thinking, answer = self.replies.pop(0) if self.replies else ("", "again")
        return FakeReply(self, user, thinking, answer)

    def set(self, name: str, value: Any) -> None:
        name = setting_name(name)  # the real Chat's validation, through the one settings record
        self.explicit[name] = validate_setting(name, value)

    def unset(self, name: str) -> None:
        self.explicit.pop(name, None)

    def undo(self) -> None:
        if not self.turns:
            raise HistoryError("nothing to undo: the conversation is empty")
        self.turns.pop()

    def reset(self) -> None:
        self.turns = []

    def save(self, path: Path, with_cache: bool = False) -> int | None:
        Path(path).write_text(json.dumps({"messages": self.messages}))
        return 1234 if with_cache else None

    def load(self, path: Path) -> None:
        self.calls.append(("load", Path(path)))
        self.turns = [Turn("q", "a"), Turn("q2", "a2")]


def run_repl(
    chat: FakeChat, lines: list[str], *, terminal: bool = False, show_thinking: bool = False
) -> str:
    output = io.StringIO()
    console = Console(
        file=output,
        force_terminal=terminal,
        width=80,
        height=20,
        color_system=None,
        highlight=False,
    )
    feed = iter(lines)

    def read() -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    Repl(chat, console, read, show_thinking=show_thinking).run()
    return output.getvalue()


def test_a_message_streams_the_answer_and_a_stats_line() -> None:
    chat = FakeChat([("let me add", "Two plus two is four.")])
    out = run_repl(chat, ["What is 2+2?"])
    assert chat.sent == ["What is 2+2?"]
    assert "Two plus two is four." in out
    assert stats_line(chat.last_result) in out
    assert "thought for" in out and "3 tokens" in out  # folded: three words of thinking
    assert "let me add" not in out


def test_show_thinking_prints_the_reasoning() -> None:
    out = run_repl(FakeChat([("let me add", "Four.")]), ["q"], show_thinking=True)
    assert "let me add" in out and "thought for" in out


@pytest.mark.parametrize("terminal", [False, True])
def test_ctrl_c_mid_reply_keeps_the_partial_answer_and_the_session(terminal: bool) -> None:
    chat = FakeChat([("", "one two three four"), ("", "five six")], interrupt_after=2)
    out = run_repl(chat, ["count", "more"], terminal=terminal)
    assert chat.sent == ["count", "more"]
    assert (chat.turns[0].user, chat.turns[0].answer) == ("count", "one two")
    assert chat.turns[0].finish_reason == "interrupted"
    assert "interrupted" in out
    assert "five six" in out


def test_live_terminal_rendering_prints_the_final_answer_as_markdown() -> None:
    out = run_repl(FakeChat([("hmm", "Some **bold** words")]), ["q"], terminal=True)
    # The live region is transient: after it stops (cursor shown again) the answer is printed once.
    after_live = out.rsplit("\x1b[?25h", 1)[-1]
    assert "Some bold words" in after_live  # Markdown rendered: no asterisks
    assert "**" not in after_live
    assert "thought for" in out


def test_commands_reach_the_chat(tmp_path: Path) -> None:
    chat = FakeChat([("", "A1"), ("", "A2"), ("pondering", "A3")])
    saved = tmp_path / "t.json"
    out = run_repl(
        chat,
        [
            "/no_think",
            "/set temp 0.2",
            "/system Be brief.",
            "first",
            "second",
            "/undo",
            "/retry",
            f"/save {saved}",
            "/context",
            "/stats",
            "/settings",
            "/set top_p default",
            "/bogus",
            "//literal",
        ],
    )
    assert chat.thinking is False
    assert chat.explicit == {"temperature": 0.2}
    assert chat.system == "Be brief."
    assert chat.sent == ["first", "second", "/literal"]
    assert ("retry", "first") in chat.calls
    assert saved.is_file() and saved.with_suffix(".md").is_file()
    markdown = saved.with_suffix(".md").read_text()
    assert "## System" in markdown and "Be brief." in markdown and "## You" in markdown
    assert "<summary>Thinking</summary>\n\npondering" in markdown and "A3" in markdown
    assert "A2" not in markdown  # undone
    assert "123 of 4,096 tokens" in out
    assert "decode speed" in out and "42.5 tok/s" in out
    assert "Unknown command /bogus" in out


def test_errors_from_the_chat_are_shown_and_the_repl_goes_on() -> None:
    chat = FakeChat([("", "fine")])
    out = run_repl(chat, ["/undo", "/set temp 5", "/retry", "hello"])
    assert "Error: nothing to undo" in out
    assert "temperature must be in [0, 2], got 5" in out  # refused by /set itself
    assert "Error: nothing to retry" in out
    assert chat.sent == ["hello"]


def test_exit_stops_reading() -> None:
    chat = FakeChat()
    run_repl(chat, ["/exit", "never sent"])
    assert chat.sent == []


def test_load_and_reset(tmp_path: Path) -> None:
    chat = FakeChat()
    out = run_repl(chat, [f"/load {tmp_path / 'x.json'}", "/reset"])
    assert ("load", tmp_path / "x.json") in chat.calls
    assert "2 exchanges" in out
    assert chat.turns == []


def test_thinking_view_toggle() -> None:
    chat = FakeChat([("secret plan", "A"), ("other plan", "B")])
    out = run_repl(chat, ["/thinking show", "q1", "/thinking hide", "q2"])
    assert "secret plan" in out and "other plan" not in out


def test_help_lists_commands() -> None:
    out = run_repl(FakeChat(), ["/help"])
    assert "/set name value" in out and "/save [file]" in out


def test_view_helpers() -> None:
    assert thought_line(4.21, 183) == "thought for 4.2 s, 183 tokens"
    assert thought_line(1.0, 1, finished=False) == "thought for 1.0 s, 1 token (unfinished)"
    assert (
        format_settings({"temperature": 0.6, "top_k": 20, "seed": None, "presence_penalty": 0.0})
        == "temp 0.6 · top_k 20"
    )
    assert "stopped at max_tokens" in stats_line(make_result("x", finish="length"))


def test_reply_view_without_result_still_closes() -> None:
    output = io.StringIO()
    view = ReplyView(Console(file=output, force_terminal=True, width=60, height=10))
    with view:
        view.feed(AnswerText("partial"))
    view.finish(None)
    assert "partial" in output.getvalue()


def test_parse_line_is_what_the_repl_uses() -> None:
    # The REPL is a view over parse_line: the same text makes the same decision.
    assert parse_line("/no_think hello").kind == "send"


def test_markdown_tail_cuts_at_a_paragraph_and_reopens_code() -> None:
    from qwen3_mlx.cli.render import markdown_tail

    assert markdown_tail("short", 100) == "short"
    text = "para one\n\n```py\nx = 1\n\nmore code\n"
    assert markdown_tail(text, 12) == "```\nmore code\n"
    assert markdown_tail("intro\n\nsecond paragraph here", 25) == "second paragraph here"
    assert markdown_tail("x" * 50, 10) == "x" * 50  # no break to cut at: keep it all


def test_live_view_redraws_are_throttled() -> None:
    output = io.StringIO()
    view = ReplyView(Console(file=output, force_terminal=True, width=60, height=10))
    draws = []
    with view:
        original = view.live.update
        view.live.update = lambda *a, **k: (draws.append(1), original(*a, **k))
        for _ in range(200):
            view.feed(AnswerText("word "))
    view.finish(make_result("word " * 200))
    assert 1 <= len(draws) < 20  # 200 pieces in well under a second: a handful of redraws
    assert output.getvalue().count("word") >= 200


def test_a_long_prefill_shows_tokens_read_rate_and_time_left() -> None:
    output = io.StringIO()
    console = Console(file=output, force_terminal=True, width=120, height=20, color_system=None)
    view = ReplyView(console)
    with view:
        view.prefill_progress(0, 40_000)  # starts the clock
        view.prefill_progress(4_096, 40_000)
        view.prefill_progress(512, 1_000)  # short prompts show nothing new
    shown = output.getvalue()
    assert "reading the prompt: 4,096 of 40,000 tokens" in shown and "s left" in shown
    assert "of 1,000 tokens" not in shown


def test_stats_show_speculation_only_when_tokens_were_drafted() -> None:
    from dataclasses import replace

    from qwen3_mlx.cli.render import stats_lines

    plain = make_result("x", generated=12)
    assert not any(line.startswith("speculation") for line in stats_lines(plain))
    drafted = replace(plain, target_steps=5, drafted_tokens=10, accepted_tokens=7)
    assert stats_lines(drafted)[-1] == (
        "speculation        7 of 10 drafted tokens accepted (70 %), 2.40 tokens per target step"
    )
