"""Our prompt tokens equal transformers' apply_chat_template(tokenize=True) on an AutoTokenizer
loaded from the same files, for many conversations, both thinking switches and all three
templates (current Qwen3, the April 2025 original, Thinking-2507)."""

from __future__ import annotations

from typing import Any

import pytest
from chat_fakes import ScriptedModel, load_fixture_tokenizer

from qwen3_mlx.chat import Chat
from qwen3_mlx.engine import render_prompt
from qwen3_mlx.generation_config import GenerationConfig
from qwen3_mlx.history import Turn, history_messages

VARIANTS = ("qwen3-4b", "qwen3-4b-original", "qwen3-4b-thinking-2507")

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time.",
        "parameters": {"type": "object", "properties": {}},
    },
}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str, **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": text, **extra}


def system(text: str) -> dict[str, Any]:
    return {"role": "system", "content": text}


def tool_call(name: str, arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


def tool(text: str) -> dict[str, Any]:
    return {"role": "tool", "content": text}


CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = {
    "single_user": ([user("Hello!")], None),
    "system_and_user": ([system("You are a helpful assistant."), user("Hi")], None),
    "soft_no_think": ([user("What is 2 + 2? /no_think")], None),
    "soft_think": ([user("/think Explain gravity.")], None),
    "system_switch_then_user_switch": ([system("Be brief. /no_think"), user("Why? /think")], None),
    "two_turns_plain": (
        [user("Hi"), assistant("Hello! How can I help?"), user("Tell a joke.")],
        None,
    ),
    "history_reasoning_content": (
        [user("2+2?"), assistant("4", reasoning_content="Two plus two is four."), user("3+3?")],
        None,
    ),
    "history_inline_think": (
        [
            user("Capital of France?"),
            assistant("<think>\nIt is Paris.\n</think>\n\nParis."),
            user("And Spain?"),
        ],
        None,
    ),
    "history_close_only": (
        [user("x"), assistant("reasoning here\n</think>\n\nanswer"), user("y")],
        None,
    ),
    "history_empty_think": (
        [user("a /no_think"), assistant("<think>\n\n</think>\n\nA."), user("b")],
        None,
    ),
    "three_turns_switches": (
        [user("one /no_think"), assistant("1"), user("two /think"), assistant("2"), user("three")],
        None,
    ),
    "unicode_mix": (
        [system("Réponds en français 🇫🇷"), user("日本語で答えて: 🦜 мир مرحبا e\u0301 👩\u200d💻")],
        None,
    ),
    "whitespace_edges": (
        [user("\n\n  leading and trailing  \n\t"), assistant(" spaced "), user("\r\nwindows\r\n")],
        None,
    ),
    "literal_think_text": ([user("What does <think> mean? And </think>?")], None),
    "literal_special_text": ([user("Print <|im_end|> and <|endoftext|> literally")], None),
    "tools_single_user": ([user("Weather in Paris?")], [WEATHER_TOOL]),
    "tools_with_system": (
        [system("Use tools when needed."), user("Time?")],
        [WEATHER_TOOL, TIME_TOOL],
    ),
    "tool_call_and_response": (
        [
            user("Weather in Oslo?"),
            assistant("", tool_calls=[tool_call("get_weather", {"city": "Oslo", "unit": "C"})]),
            tool('{"temp": -3}'),
        ],
        [WEATHER_TOOL],
    ),
    "tool_call_string_arguments": (
        [
            user("Time?"),
            assistant("Checking.", tool_calls=[tool_call("get_time", "{}")]),
            tool("12:00"),
        ],
        [TIME_TOOL],
    ),
    "parallel_tool_responses": (
        [
            user("Weather in Rome and the time?"),
            assistant(
                "",
                reasoning_content="Two calls.",
                tool_calls=[tool_call("get_weather", {"city": "Rome"}), tool_call("get_time", {})],
            ),
            tool('{"temp": 21}'),
            tool("09:30"),
        ],
        [WEATHER_TOOL, TIME_TOOL],
    ),
    "tool_flow_then_user": (
        [
            user("Weather in Lima?"),
            assistant("", tool_calls=[tool_call("get_weather", {"city": "Lima"})]),
            tool('{"temp": 18}'),
            assistant("It is 18 degrees in Lima."),
            user("Thanks! /no_think"),
        ],
        [WEATHER_TOOL],
    ),
    "empty_assistant_answer": (
        [user("Say nothing"), assistant(""), user("Now say something")],
        None,
    ),
    "long_conversation": (
        [m for i in range(6) for m in (user(f"Question {i}?"), assistant(f"Answer {i}."))]
        + [user("Last?")],
        None,
    ),
    "system_only": ([system("Only a system prompt.")], None),
    "user_looks_like_tool_response": ([user("<tool_response>\nfake\n</tool_response>")], None),
    "answer_spelling_close_think": (
        [user("tags?"), assistant("Use </think> to close.", reasoning_content=""), user("ok")],
        None,
    ),
    "markdown_and_code": (
        [
            user("Show code"),
            assistant("```python\nprint('hi')\n```\n\n| a | b |\n|---|---|"),
            user("JSON?"),
        ],
        None,
    ),
    "long_message": ([user("word " * 400)], None),
    "switch_with_punctuation": (
        [user("Quick one/no_think."), assistant("Sure."), user("Again (/think)")],
        None,
    ),
    "math_and_numbers": ([system("Use LaTeX."), user("Solve x^2 - 5x + 6 = 0, 3.14159 ≈ π")], None),
    "chat_history_shape": (
        history_messages(
            "You are a tiny test model.",
            [
                Turn("Add 2 and 3.", "5", "2 + 3 = 5."),
                Turn("Reverse: a b /no_think", "b a"),
                Turn("Count: x y", ""),
            ],
        )
        + [user("Sort: moon apple")],
        None,
    ),
    "assistant_last_prefill": ([user("Continue"), assistant("Partial answer")], None),
}


def reference_tokenizer(variant: str) -> Any:
    """The AutoTokenizer (transformers) loaded from the fixture folder; our Tokenizer wraps this
    same object but renders to text and encodes that, which is the path under test."""
    return load_fixture_tokenizer(variant).hf


def reference_ids(
    variant: str, messages: list[dict[str, Any]], tools: Any, **kwargs: Any
) -> list[int]:
    encoded = reference_tokenizer(variant).apply_chat_template(
        messages, tools=tools, tokenize=True, **kwargs
    )
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)


def test_there_are_at_least_thirty_conversations() -> None:
    assert len(CONVERSATIONS) >= 30


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_prompt_tokens_equal_transformers(name: str) -> None:
    messages, tools = CONVERSATIONS[name]
    for variant in VARIANTS:
        tokenizer = load_fixture_tokenizer(variant)
        switches = (True, False) if tokenizer.has_thinking_switch else (True,)
        for thinking in switches:
            ours = render_prompt(tokenizer, messages, thinking=thinking, tools=tools)
            kwargs = {"enable_thinking": thinking} if tokenizer.has_thinking_switch else {}
            expected = reference_ids(variant, messages, tools, add_generation_prompt=True, **kwargs)
            assert ours == expected, (variant, thinking)
        # Without the generation prompt too (what context_used counts).
        ours = tokenizer.render(messages, tools=tools, add_generation_prompt=False)
        assert ours == reference_ids(variant, messages, tools, add_generation_prompt=False)


@pytest.mark.parametrize("variant", VARIANTS)
def test_chat_prompts_equal_transformers(variant: str) -> None:
    """The tokens a real Chat feeds its model, turn after turn, are transformers' tokens."""
    tokenizer = load_fixture_tokenizer(variant)

    def script(text: str) -> str:
        if ("/no_think" in text or not chat.thinking) and tokenizer.has_thinking_switch:
            return "<think>\n\n</think>\n\nok<|im_end|>"
        return "<think>\nhmm 🦜\n</think>\n\nsure: " + text.split()[0] + "<|im_end|>"

    model = ScriptedModel(tokenizer, script)
    chat = Chat(
        model,
        tokenizer,
        GenerationConfig(),
        system="Be kind.",
        sampling={"temperature": 0.5, "top_p": 1.0},
    )
    hybrid = tokenizer.has_thinking_switch
    for text, thinking in [
        ("alpha", True),
        ("beta /no_think", True),
        ("gamma", not hybrid),
        ("délta ü", True),
    ]:
        chat.thinking = thinking
        reply = chat.send(text)
        reply.text()
        result = reply.result
        kwargs = {"enable_thinking": thinking} if hybrid else {}
        expected = reference_ids(
            variant, chat.messages[:-1], None, add_generation_prompt=True, **kwargs
        )
        assert chat.cache.tokens[: result.prompt_tokens] == expected
        assert result.prompt_tokens == len(expected)
