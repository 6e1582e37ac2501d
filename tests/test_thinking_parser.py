"""The think/answer split by token id, the prompt's starting phase, soft switches, and the
streaming text layer (detokenized pieces, edge newlines, stop ids) over random token streams."""

from __future__ import annotations

import re

import pytest
from chat_fakes import load_fixture_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3_mlx.engine import render_prompt
from qwen3_mlx.events import AnswerText, ThinkingText
from qwen3_mlx.generate import GeneratedToken
from qwen3_mlx.stream import ReplyStream
from qwen3_mlx.thinking import (
    Part,
    Phase,
    ThinkParser,
    latest_soft_switch,
    prompt_phase,
    split_tokens,
    thinking_active,
)
from qwen3_mlx.tokenizer import IM_END_ID, THINK_END_ID, THINK_START_ID

OPEN, CLOSE = THINK_START_ID, THINK_END_ID
USER = [{"role": "user", "content": "Add 2 and 3."}]


@pytest.mark.parametrize(
    ("variant", "thinking", "phase"),
    [
        ("qwen3-4b", True, Phase.START),
        ("qwen3-4b", False, Phase.ANSWER),
        ("qwen3-4b-original", True, Phase.START),
        ("qwen3-4b-original", False, Phase.ANSWER),
        ("qwen3-4b-thinking-2507", True, Phase.THINKING),
    ],
)
def test_prompt_phase_follows_each_template(variant: str, thinking: bool, phase: Phase) -> None:
    tokenizer = load_fixture_tokenizer(variant)
    assert prompt_phase(render_prompt(tokenizer, USER, thinking=thinking)) is phase


def test_prompt_phase_ignores_think_blocks_of_earlier_turns() -> None:
    tokenizer = load_fixture_tokenizer("qwen3-4b")
    # A history turn rendered with a closed block (a tool-call flow) must not leak into the phase.
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "<think>\nx\n</think>\n\nyo"},
    ]
    prompt = render_prompt(tokenizer, history + USER, thinking=True)
    assert prompt_phase(prompt) is Phase.START


def labels(tokens: list[int], phase: Phase = Phase.START) -> list[Part]:
    parser = ThinkParser(phase)
    return [parser.feed(token) for token in tokens]


def test_parser_splits_a_thinking_reply() -> None:
    tokens = [OPEN, 1, 2, CLOSE, 3, 4]
    assert labels(tokens) == [
        Part.OPEN,
        Part.THINKING,
        Part.THINKING,
        Part.CLOSE,
        Part.ANSWER,
        Part.ANSWER,
    ]
    assert split_tokens(tokens) == ([1, 2], [3, 4])


def test_parser_for_a_prompt_that_already_opened_think() -> None:
    # Thinking-2507: the output carries only </think>.
    assert split_tokens([1, 2, CLOSE, 3], Phase.THINKING) == ([1, 2], [3])
    parser = ThinkParser(Phase.THINKING)
    assert [parser.feed(t) for t in (5, 6)] == [Part.THINKING, Part.THINKING]
    assert not parser.thinking_finished


def test_parser_empty_think_block_and_no_block() -> None:
    assert split_tokens([OPEN, 271, CLOSE, 271, 9]) == ([271], [271, 9])
    parser = ThinkParser()
    assert [parser.feed(t) for t in (7, 8)] == [Part.ANSWER, Part.ANSWER]
    assert parser.thinking_finished and not parser.saw_block


def test_think_tokens_inside_the_answer_are_answer() -> None:
    # Once the answer has begun, a stray <think> or </think> id is just more answer.
    assert labels([5, OPEN, CLOSE]) == [Part.ANSWER, Part.ANSWER, Part.ANSWER]
    assert labels([6, CLOSE], Phase.ANSWER) == [Part.ANSWER, Part.ANSWER]


def test_parser_stopped_inside_thinking_is_unfinished() -> None:
    parser = ThinkParser()
    for token in (OPEN, 1, 2):
        parser.feed(token)
    assert not parser.thinking_finished


# Token streams over an alphabet rich in markers, for each template style.
tokens_strategy = st.lists(st.sampled_from([OPEN, CLOSE, 11, 12, 13]), max_size=40)
PHASES = [Phase.START, Phase.ANSWER, Phase.THINKING]


@settings(max_examples=200, deadline=None)
@given(tokens=tokens_strategy, phase=st.sampled_from(PHASES))
def test_parts_rebuild_the_stream(tokens: list[int], phase: Phase) -> None:
    parts = labels(tokens, phase)
    # Markers + thinking + answer, kept in stream order, give back every token.
    assert len(parts) == len(tokens)
    thinking, answer = split_tokens(tokens, phase)
    markers = [t for t, p in zip(tokens, parts, strict=True) if p in (Part.OPEN, Part.CLOSE)]
    assert len(thinking) + len(answer) + len(markers) == len(tokens)
    assert [t for t, p in zip(tokens, parts, strict=True) if p is Part.THINKING] == thinking
    assert [t for t, p in zip(tokens, parts, strict=True) if p is Part.ANSWER] == answer
    # The shape is always: optional open, thinking, a close, then answer, and nothing else.
    shape = "".join(
        {Part.OPEN: "o", Part.CLOSE: "c", Part.THINKING: "t", Part.ANSWER: "a"}[p] for p in parts
    )
    allowed = {
        Phase.START: r"(ot*(ca*)?|ca*|a*)",
        Phase.ANSWER: r"a*",
        Phase.THINKING: r"t*(ca*)?",
    }[phase]
    assert re.fullmatch(allowed, shape), shape
    assert CLOSE not in thinking


# Units of real token ids that together form valid text: multi-token characters (🦜 is two byte
# tokens), words, newlines, spaces, and the characters "</think>" spelled with ordinary tokens.
UNITS = {
    "word": [9707],  # "Hello"
    "space_word": [1879],  # " world"
    "parrot": [123918, 250],  # "🦜"
    "melt": [9284, 104, 254],  # "🫠"
    "cjk": [104811, 48391],  # "中文字符"
    "newline": [198],
    "blank": [271],  # "\n\n"
    "space": [220],
    "fake_close": [522, 26865, 29],  # "</think>" as plain text
    "open": [OPEN],
    "close": [CLOSE],
    "stop": [IM_END_ID],
}


def expected_section(tokenizer, ids: list[int]) -> str:
    """What a section should show: the decoded text without leading spaces and newlines, nor
    trailing newlines."""
    return tokenizer.decode(ids).lstrip(" \n").rstrip("\n")


@settings(max_examples=300, deadline=None)
@given(
    units=st.lists(st.sampled_from(sorted(UNITS)), max_size=30),
    variant=st.sampled_from(["qwen3-4b", "qwen3-4b-thinking-2507"]),
    thinking=st.booleans(),
)
def test_streamed_text_rebuilds_each_section(
    units: list[str], variant: str, thinking: bool
) -> None:
    tokenizer = load_fixture_tokenizer(variant)
    phase = prompt_phase(
        render_prompt(tokenizer, USER, thinking=thinking or variant.endswith("2507"))
    )
    tokens = [token for unit in units for token in UNITS[unit]]
    stream = ReplyStream(tokenizer, phase, {IM_END_ID})
    events = list(stream.run(GeneratedToken(t, 0.01 * i) for i, t in enumerate(tokens)))
    result = stream.result(10, 10)

    consumed = tokens[: tokens.index(IM_END_ID) + 1] if IM_END_ID in tokens else tokens
    assert stream.tokens == consumed
    assert stream.finish_reason == ("stop" if IM_END_ID in tokens else "length")
    thinking_ids, answer_ids = split_tokens([t for t in consumed if t != IM_END_ID], phase)
    shown_thinking = "".join(e.text for e in events if isinstance(e, ThinkingText))
    shown_answer = "".join(e.text for e in events if isinstance(e, AnswerText))
    assert shown_thinking == result.thinking == expected_section(tokenizer, thinking_ids)
    assert shown_answer == result.answer == expected_section(tokenizer, answer_ids)
    # Never half a character, never an empty event.
    assert all(e.text and "\ufffd" not in e.text for e in events)


def test_text_spelling_close_think_stays_in_the_thinking() -> None:
    tokenizer = load_fixture_tokenizer("qwen3-4b")
    tokens = [
        OPEN,
        9707,
        *UNITS["fake_close"],
        1879,
        CLOSE,
        271,
        9707,
        *UNITS["fake_close"],
        IM_END_ID,
    ]
    stream = ReplyStream(tokenizer, Phase.START, {IM_END_ID})
    list(stream.run(GeneratedToken(t, 0.0) for t in tokens))
    result = stream.result(1, 1)
    assert result.thinking == "Hello</think> world"
    assert result.answer == "Hello</think>"
    assert result.thinking_finished


def test_reply_cut_by_max_tokens_inside_thinking_is_not_an_answer() -> None:
    tokenizer = load_fixture_tokenizer("qwen3-4b")
    tokens = [OPEN, 198, 9707, 1879, 198]
    stream = ReplyStream(tokenizer, Phase.START, {IM_END_ID})
    events = list(stream.run(GeneratedToken(t, 0.1 * i) for i, t in enumerate(tokens)))
    result = stream.result(5, 5)
    assert result.finish_reason == "length"
    assert not result.thinking_finished
    assert result.thinking == "Hello world" and result.answer == ""
    assert not any(isinstance(e, AnswerText) for e in events)


def test_newlines_around_sections_are_not_shown_but_inner_ones_are() -> None:
    tokenizer = load_fixture_tokenizer("qwen3-4b")
    tokens = [OPEN, 198, 9707, 271, 1879, 198, CLOSE, 271, 9707, 198, IM_END_ID]
    stream = ReplyStream(tokenizer, Phase.START, {IM_END_ID})
    events = list(stream.run(GeneratedToken(t, 0.0) for t in tokens))
    assert [type(e).__name__ for e in events] == ["ThinkingText", "ThinkingText", "AnswerText"]
    assert "".join(e.text for e in events[:2]) == "Hello\n\n world"
    assert events[2].text == "Hello"


@pytest.mark.parametrize(
    ("messages", "switch"),
    [
        ([{"role": "user", "content": "hi"}], None),
        ([{"role": "user", "content": "hi /no_think"}], "no_think"),
        (
            [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "hi /think"}],
            "think",
        ),
        ([{"role": "user", "content": "a /think then /no_think"}], "no_think"),
        (
            [{"role": "user", "content": "/no_think"}, {"role": "assistant", "content": "/think"}],
            "no_think",
        ),
        ([{"role": "user", "content": "path /thinking/x"}], None),
    ],
)
def test_latest_soft_switch(messages: list[dict], switch: str | None) -> None:
    assert latest_soft_switch(messages) == switch


def test_thinking_active_combines_the_switches() -> None:
    no_think = [{"role": "user", "content": "x /no_think"}]
    assert thinking_active(USER, hard_switch=True, has_switch=True)
    assert not thinking_active(no_think, hard_switch=True, has_switch=True)
    assert not thinking_active(USER, hard_switch=False, has_switch=True)
    assert thinking_active(no_think, hard_switch=True, has_switch=False)  # 2507 always thinks
