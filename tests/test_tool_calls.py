"""Tool calls in the engine: parsing by token id (never inside <think>), invalid calls kept, the
history of a tool loop, exact prefix reuse through it, and the parser's properties (hypothesis)."""

from __future__ import annotations

import json

import pytest
from chat_fakes import ScriptedModel, load_fixture_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3_mlx.chat import Chat
from qwen3_mlx.engine import render_prompt
from qwen3_mlx.errors import HistoryError, ToolError
from qwen3_mlx.events import AnswerText, ThinkingText, ToolCallEvent, ToolCallText
from qwen3_mlx.generation_config import GenerationConfig
from qwen3_mlx.thinking import (
    TOOL_CALL_END_ID,
    TOOL_CALL_START_ID,
    Part,
    Phase,
    segments,
)
from qwen3_mlx.tokenizer import THINK_END_ID, THINK_START_ID
from qwen3_mlx.tools import ToolResult, parse_call

LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "The secret word for a word.",
        "parameters": {
            "type": "object",
            "properties": {"key": {"type": "string"}},
            "required": ["key"],
        },
    },
}
COUNT = {
    "type": "function",
    "function": {
        "name": "word_count",
        "description": "Count the words of a text.",
        "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
    },
}
GREEDY = {"temperature": 0.0}
pytestmark = pytest.mark.filterwarnings("ignore::qwen3_mlx.settings.GreedyThinkingWarning")


def call_text(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def loop_script(user: str) -> str:
    """A three-step agent: look a word up, count the answer's words, then answer."""
    if user.startswith("<tool_response>"):
        result = user.removeprefix("<tool_response>\n").removesuffix("\n</tool_response>")
        if result.isdigit():
            return f"<think>\nThe count is {result}.\n</think>\n\nIt has {result} word.<|im_end|>"
        step = call_text("word_count", json.dumps({"text": result}))
        return f"<think>\nNow count {result}.\n</think>\n\n{step}<|im_end|>"
    if "secret" in user:
        step = call_text("lookup", '{"key": "moon — 月"}')
        return f"<think>\nI need the lookup tool.\n</think>\n\n{step}<|im_end|>"
    return f"<think>\nNo tool needed.\n</think>\n\nJust {user}.<|im_end|>"


def make_chat(script=loop_script, **kwargs) -> tuple[Chat, ScriptedModel]:
    tokenizer = load_fixture_tokenizer("qwen3-4b")
    model = ScriptedModel(tokenizer, script)
    kwargs.setdefault("sampling", GREEDY)
    kwargs.setdefault("tools", [LOOKUP, COUNT])
    return Chat(model, tokenizer, GenerationConfig(), **kwargs), model


def test_a_call_is_parsed_with_its_exact_argument_text_and_finishes_with_tool_calls() -> None:
    chat, _ = make_chat()
    reply = chat.send("What is the secret word for moon?")
    events = list(reply)
    result = reply.result
    assert result.finish_reason == "tool_calls"
    (call,) = result.tool_calls
    assert call.valid and call.name == "lookup"
    assert call.arguments_text == '{"key": "moon — 月"}' and call.arguments == {"key": "moon — 月"}
    assert [e.call for e in events if isinstance(e, ToolCallEvent)] == [call]
    written = "".join(e.text for e in events if isinstance(e, ToolCallText))
    assert written == '{"name": "lookup", "arguments": {"key": "moon — 月"}}'
    assert result.answer == "" and result.thinking == "I need the lookup tool."
    # The history keeps the call and, inside the unfinished loop, the reasoning.
    assert chat.messages[-1] == {
        "role": "assistant",
        "content": "",
        "reasoning_content": "I need the lookup tool.",
        "tool_calls": [call.message()],
    }


def test_a_tool_call_inside_thinking_is_thinking_text_and_never_a_call() -> None:
    drafted = call_text("lookup", '{"key": "x"}')
    chat, _ = make_chat(lambda u: f"<think>\nMaybe {drafted} later.\n</think>\n\nNo.<|im_end|>")
    reply = chat.send("hi")
    events = list(reply)
    assert reply.result.tool_calls == () and reply.result.finish_reason == "stop"
    assert not any(isinstance(e, ToolCallEvent | ToolCallText) for e in events)
    assert "<tool_call>" in reply.result.thinking and reply.result.answer == "No."


def test_malformed_json_is_an_invalid_call_never_dropped() -> None:
    broken = '<tool_call>\n{"name": "lookup", "arguments": {"key": "moon"\n</tool_call>'

    def script(user: str) -> str:
        if user.startswith("<tool_response>"):
            return "<think>\nOops.\n</think>\n\nSorry.<|im_end|>"
        return f"<think>\nCall.\n</think>\n\n{broken}<|im_end|>"

    chat, _ = make_chat(script)
    reply = chat.send("secret?")
    events = list(reply)
    (call,) = reply.result.tool_calls
    assert not call.valid and "not a JSON object" in call.error
    assert call.arguments_text == '{"name": "lookup", "arguments": {"key": "moon"'
    assert [e.call for e in events if isinstance(e, ToolCallEvent)] == [call]
    assert reply.result.finish_reason == "stop"  # no valid call: nothing for a tool to run
    assert "invalid tool call" in call.describe()
    # Kept in the history (raw text as arguments), so the model can be told what was wrong.
    assert chat.messages[-1]["tool_calls"] == [call.message()]
    chat.send_tool_results([ToolResult("Error: not valid JSON", call.id)]).text()
    assert chat.messages[-2] == {
        "role": "tool",
        "content": "Error: not valid JSON",
        "tool_call_id": call.id,
    }
    with pytest.raises(HistoryError, match="no tool call to answer"):
        chat.send_tool_results([ToolResult("x")])  # the last reply made no call at all


def test_a_call_cut_off_by_max_tokens_is_an_invalid_call() -> None:
    chat, _ = make_chat(sampling={"temperature": 0.0, "max_tokens": 16})
    reply = chat.send("What is the secret word for moon?")
    reply.text()
    (call,) = reply.result.tool_calls
    assert reply.result.finish_reason == "length"
    assert not call.valid and "cut off before </tool_call>" in call.error


def test_prefix_reuse_through_a_three_step_tool_loop() -> None:
    chat, model = make_chat()
    reply = chat.send("What is the secret word for moon?")
    reply.text()
    steps = [reply.result]
    call = reply.result.tool_calls[0]
    reply = chat.send_tool_results([ToolResult("river star", call.id)])
    reply.text()
    steps.append(reply.result)
    count_call = reply.result.tool_calls[0]
    assert count_call.arguments == {"text": "river star"}
    reply = chat.send_tool_results([ToolResult("2", count_call.id)])
    assert reply.text() == "It has 2 word."
    steps.append(reply.result)
    assert [s.finish_reason for s in steps] == ["tool_calls", "tool_calls", "stop"]
    # Each step prefills only the tool result and the new generation prompt: the previous
    # prompt and every generated token (the exact argument text re-rendered) stay cached.
    for before, after in zip(steps, steps[1:], strict=False):
        cached = before.prompt_tokens + before.generated_tokens
        assert after.prompt_tokens - after.prefilled_tokens == cached
        assert after.prefilled_tokens < 20
    prompt = render_prompt(chat.tokenizer, chat.messages[:-1], tools=chat.tools)
    assert chat.cache.tokens[: len(prompt)] == prompt
    # The reasoning of every step of the unfinished loop is in the history.
    assert [m.get("reasoning_content") for m in chat.messages if m["role"] == "assistant"] == [
        "I need the lookup tool.",
        "Now count river star.",
        "The count is 2.",
    ]


def test_a_new_user_turn_after_a_loop_drops_the_loops_reasoning_from_the_prompt() -> None:
    chat, _ = make_chat()
    chat.send("What is the secret word for moon?").text()
    call = chat.turns[-1].tool_calls[0]
    chat.send_tool_results([ToolResult("7", call.id)]).text()
    reply = chat.send("thanks")
    assert reply.text() == "Just thanks."
    prompt_text = chat.tokenizer.decode(chat.cache.tokens[: reply.result.prompt_tokens])
    assert "I need the lookup tool." not in prompt_text  # before the last user query: dropped
    assert "<tool_response>\n7\n</tool_response>" in prompt_text


def test_results_are_put_in_call_order_by_id_and_unknown_ids_are_refused() -> None:
    both = call_text("lookup", '{"key": "a"}') + "\n" + call_text("lookup", '{"key": "b"}')
    seen = []

    def script(user: str) -> str:
        seen.append(user)
        if user.startswith("<tool_response>"):
            return "<think>\nDone.\n</think>\n\nok<|im_end|>"
        return f"<think>\nTwo.\n</think>\n\n{both}<|im_end|>"

    chat, _ = make_chat(script)
    chat.send("two lookups").text()
    first, second = chat.turns[-1].tool_calls
    with pytest.raises(ToolError, match="answers no call of the last reply"):
        chat.send_tool_results([ToolResult("x", "call_nope")])
    chat.send_tool_results([ToolResult("B", second.id), ToolResult("A", first.id)]).text()
    assert [m["content"] for m in chat.messages if m["role"] == "tool"] == ["A", "B"]
    assert "<tool_response>\nA\n</tool_response>\n<tool_response>\nB" in seen[-1]


def test_a_retried_tool_step_answers_the_same_results() -> None:
    chat, _ = make_chat()
    chat.send("What is the secret word for moon?").text()
    call = chat.turns[-1].tool_calls[0]
    chat.send_tool_results([ToolResult("river", call.id)]).text()
    again = chat.retry()
    again.text()
    assert again.result.tool_calls[0].arguments == {"text": "river"}
    assert len(chat.turns) == 2 and chat.turns[-1].tool_results[0].content == "river"


def test_transcripts_keep_tool_loops(tmp_path) -> None:
    chat, _ = make_chat()
    chat.send("What is the secret word for moon?").text()
    call = chat.turns[-1].tool_calls[0]
    chat.send_tool_results([ToolResult("river", call.id)]).text()
    chat.save(tmp_path / "loop.json")
    again, _ = make_chat()
    again.load(tmp_path / "loop.json")
    assert again.turns == chat.turns and again.messages == chat.messages


def test_bad_tools_and_tool_choices_are_refused_in_one_line() -> None:
    with pytest.raises(ToolError, match="tool 1 has no function name"):
        make_chat(tools=[{"type": "function", "function": {}}])
    with pytest.raises(ToolError, match="given twice"):
        make_chat(tools=[LOOKUP, LOOKUP])
    with pytest.raises(ToolError, match="not among the tools"):
        make_chat(tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ToolError, match="needs at least one tool"):
        make_chat(tools=[], tool_choice="required")


@pytest.mark.parametrize(
    "body,name,arguments_text,error",
    [
        ('{"name": "f", "arguments": {"a": [1, 2]}}', "f", '{"a": [1, 2]}', None),
        ('{"arguments":{"a":1},"name":"f"}', "f", '{"a":1}', None),
        ('  {"name": "f", "arguments": {}}  ', "f", "{}", None),
        ('{"name": "f"}', "f", None, 'no "arguments"'),
        ('{"name": "f", "arguments": "x"}', "f", None, "not a JSON object"),
        ('{"name": 3, "arguments": {}}', "", None, 'no "name"'),
        ('{"name": "f", "arguments": {}} extra', "", None, "text follows"),
        ("[1]", "", None, "does not start with {"),
    ],
)
def test_parse_call(body: str, name: str, arguments_text: str | None, error: str | None) -> None:
    call = parse_call(body)
    assert call.name == name
    if error is None:
        assert call.valid and call.arguments_text == arguments_text
        assert call.arguments == json.loads(arguments_text)
    else:
        assert not call.valid and error in call.error and call.arguments is None


MARKERS = [THINK_START_ID, THINK_END_ID, TOOL_CALL_START_ID, TOOL_CALL_END_ID]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(MARKERS + [10, 11, 12]), max_size=40),
    st.sampled_from(list(Phase)[:3]),
    st.booleans(),
)
def test_segments_rebuild_the_stream_and_calls_never_come_from_thinking(
    tokens: list[int], phase: Phase, tools: bool
) -> None:
    grouped = segments(tokens, phase, tools=tools)
    assert [t for _, ids in grouped for t in ids] == tokens
    inside_think = phase is Phase.THINKING
    for part, _ids in grouped:
        if part is Part.OPEN:
            inside_think = True
        elif part is Part.CLOSE:
            inside_think = False
        if part in (Part.CALL_OPEN, Part.CALL, Part.CALL_CLOSE):
            assert tools and not inside_think
        if part is Part.THINKING:
            assert inside_think
    if not tools:
        assert all(part not in (Part.CALL_OPEN, Part.CALL_CLOSE) for part, _ in grouped)


TEXT = st.text(alphabet=st.sampled_from('ab {}":,\n1é'), max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["text", "call", "bad"]), TEXT), max_size=6))
def test_streamed_text_calls_and_invalid_calls_rebuild_the_reply(pieces) -> None:
    """Answer text, valid calls and invalid calls, streamed by the engine, give back exactly the
    reply the model wrote (each call body as written, stripped of its edge newlines)."""
    body = {"text": lambda t: t, "call": lambda t: call_text("f", json.dumps({"a": t})),
            "bad": lambda t: f"<tool_call>\n{{bad {t}\n</tool_call>"}  # fmt: skip
    reply_text = "".join(body[kind](text) for kind, text in pieces)
    # No repetition guard: five identical calls in a row are a legitimate reply here.
    chat, _ = make_chat(
        lambda u: f"<think>\nx\n</think>\n\n{reply_text}<|im_end|>", repetition_guard=None
    )
    reply = chat.send("go")
    events = list(reply)
    calls = [e.call for e in events if isinstance(e, ToolCallEvent)]
    expected_calls = [(k, t) for k, t in pieces if k != "text"]
    assert len(calls) == len(expected_calls)
    for call, (kind, text) in zip(calls, expected_calls, strict=True):
        if kind == "call":
            assert call.valid and call.arguments == {"a": text}
        else:
            assert not call.valid and call.arguments_text == f"{{bad {text}".strip()
    answer = "".join(e.text for e in events if isinstance(e, AnswerText))
    assert answer == reply.result.answer
    outside = "".join(text for kind, text in pieces if kind == "text")
    assert answer == outside.lstrip(" \n").rstrip("\n")  # edge newlines are the template's
    assert "".join(e.text for e in events if isinstance(e, ThinkingText)) == "x"
