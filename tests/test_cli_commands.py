"""The slash-command dispatcher: a typed line in, an Action out (no terminal, no model)."""

from __future__ import annotations

import pytest

from qwen3_mlx.cli.commands import COMMANDS, completions, help_text, parse_line


def test_plain_text_is_sent_unchanged() -> None:
    action = parse_line("What is 2+2?")
    assert (action.kind, action.text) == ("send", "What is 2+2?")


def test_multiline_message_is_sent_with_its_newlines() -> None:
    assert parse_line("line one\nline two\n").text == "line one\nline two"


@pytest.mark.parametrize("line", ["", "   ", "\n"])
def test_blank_lines_do_nothing(line: str) -> None:
    assert parse_line(line).kind == "nothing"


@pytest.mark.parametrize(
    "line,name", [("/think", "think"), ("/no_think", "no_think"), ("  /no_think  ", "no_think")]
)
def test_whole_line_switches_are_commands(line: str, name: str) -> None:
    action = parse_line(line)
    assert (action.kind, action.name) == ("command", name)


@pytest.mark.parametrize("line", ["/no_think what is 3+4?", "/think\nexplain this"])
def test_soft_switch_with_text_is_sent_unchanged(line: str) -> None:
    assert (parse_line(line).kind, parse_line(line).text) == ("send", line)


def test_soft_switch_inside_a_message_is_sent() -> None:
    assert parse_line("what is 3+4? /no_think").text == "what is 3+4? /no_think"


def test_double_slash_sends_a_literal_slash() -> None:
    action = parse_line("//etc/hosts is a file")
    assert (action.kind, action.text) == ("send", "/etc/hosts is a file")


def test_unknown_command_is_a_hint_and_not_sent() -> None:
    action = parse_line("/frobnicate now")
    assert action.kind == "hint"
    assert "/frobnicate" in action.text and "//" in action.text


@pytest.mark.parametrize(
    "line,argument",
    [
        ("/save", ""),
        ("/save chat.json", "chat.json"),
        ("/load a b.json", "a b.json"),
        ("/system You are terse.", "You are terse."),
        ("/system", ""),
    ],
)
def test_commands_with_arguments(line: str, argument: str) -> None:
    action = parse_line(line)
    assert action.kind == "command"
    assert action.argument == argument


@pytest.mark.parametrize(
    "line",
    ["/load", "/set", "/set temp", "/thinking", "/thinking maybe", "/reset now", "/exit please"],
)
def test_missing_or_extra_arguments_give_usage_hints(line: str) -> None:
    assert parse_line(line).kind == "hint"


@pytest.mark.parametrize(
    "line,name,value",
    [
        ("/set temp 0.3", "temperature", 0.3),
        ("/set top_k 5", "top_k", 5),
        ("/set max-tokens 64", "max_tokens", 64),
        ("/set presence_penalty -1.5", "presence_penalty", -1.5),
        ("/set seed 7", "seed", 7),
    ],
)
def test_set_parses_name_and_value(line: str, name: str, value: float) -> None:
    action = parse_line(line)
    assert (action.kind, action.name, action.argument, action.value) == (
        "command",
        "set",
        name,
        value,
    )
    assert type(action.value) is type(value)


@pytest.mark.parametrize(
    "line,fragment",
    [
        ("/set top_k 0.5", "integer"),
        ("/set temp hot", "number"),
        ("/set colour 3", "Unknown setting"),
    ],
)
def test_set_rejects_bad_values(line: str, fragment: str) -> None:
    action = parse_line(line)
    assert action.kind == "hint" and fragment in action.text


@pytest.mark.parametrize(
    "alias,name", [("/quit", "exit"), ("/q", "exit"), ("/EXIT", "exit"), ("/?", "help")]
)
def test_aliases(alias: str, name: str) -> None:
    assert parse_line(alias).name == name


def test_thinking_view_is_normalised() -> None:
    assert parse_line("/thinking SHOW").argument == "show"


def test_completions() -> None:
    assert completions("/se") == ["/set", "/settings"]
    assert completions("/s") == ["/system", "/save", "/set", "/settings", "/stats"]
    assert completions("/no") == ["/no_think"]
    assert completions("/set te") == ["temperature"]
    assert completions("/thinking h") == ["hide"]
    assert completions("hello /se") == []
    assert completions("/set temperature 0") == []


def test_help_lists_every_command() -> None:
    text = help_text()
    for usage, _ in COMMANDS.values():
        assert usage in text
