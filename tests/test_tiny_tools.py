"""The tiny trained model uses tools through the engine, end to end: it calls lookup or
word_count with the exact arguments when they fit, answers from the <tool_response>, answers
directly without tools, and tool_choice none / required / named hold on it. Greedy, held-out
prompts (tiny_model/tiny_data.py); the full evaluation is tiny_model/eval_tiny.py."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from qwen3_mlx.chat import Chat
from qwen3_mlx.tools import ToolResult

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tiny_model"))
import tiny_data  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::qwen3_mlx.settings.GreedyThinkingWarning")
TOOLS = [tiny_data.TOOLS["lookup"], tiny_data.TOOLS["word_count"]]
GREEDY = {"temperature": 0, "max_tokens": 96}


@pytest.fixture(scope="module", params=["qwen3-tiny-chat", "qwen3-tiny-chat-4bit"])
def loaded(request):
    from qwen3_mlx.loading import load

    return load(REPO / "models" / request.param)


def new_chat(loaded, **kwargs) -> Chat:
    model, tokenizer, generation_config = loaded
    kwargs.setdefault("sampling", GREEDY)
    return Chat(model, tokenizer, generation_config, **kwargs)


def test_calls_with_exact_arguments_and_answers_from_the_result(loaded) -> None:
    rng = random.Random(5)
    loops = [tiny_data.tool_loop(rng, tool, held_out=True) for tool in ("lookup", "word_count") * 5]
    right_calls = right_answers = 0
    for call, result, final in loops:
        chat = new_chat(loaded, tools=TOOLS, thinking=rng.random() < 0.5)
        reply = chat.send(call.question)
        reply.text()
        calls = reply.result.tool_calls
        expected_name, expected_arguments = call.call
        if [(c.name, c.arguments) for c in calls] == [(expected_name, expected_arguments)]:
            right_calls += 1
            assert reply.result.finish_reason == "tool_calls"
            answer = chat.send_tool_results([ToolResult(result, calls[0].id)]).text()
            right_answers += answer == final.answer
    assert right_calls >= 9 and right_answers >= 9, (right_calls, right_answers)


def test_no_call_without_tools_or_when_none_fits(loaded) -> None:
    rng = random.Random(8)
    calls = 0
    for index in range(10):
        problem = tiny_data.sample_problem(rng, held_out=True, task=tiny_data.TASKS[index % 3])
        tools = [] if index % 2 else [tiny_data.TOOLS["lookup"]]
        reply = new_chat(loaded, tools=tools, thinking=index % 3 != 0).send(problem.question)
        reply.text()
        calls += bool(reply.result.tool_calls)
    assert calls == 0


def test_tool_choice_none_required_and_named_hold(loaded) -> None:
    rng = random.Random(9)
    call, _, _ = tiny_data.tool_loop(rng, "lookup", held_out=True)
    none = new_chat(loaded, tools=TOOLS, tool_choice="none").send(call.question)
    none.text()
    assert none.result.tool_calls == () and none.result.finish_reason == "stop"
    problem = tiny_data.sample_problem(rng, held_out=True, task="reverse")
    required = new_chat(loaded, tools=TOOLS, tool_choice="required").send(problem.question)
    required.text()
    assert required.result.tool_calls
    word_count = {"type": "function", "function": {"name": "word_count"}}
    # A lookup question, but word_count is forced: the call opens with its name ...
    named = new_chat(loaded, tools=TOOLS, tool_choice=word_count).send(call.question)
    named.text()
    assert named.result.tool_calls[0].arguments_text.startswith('{"name": "word_count"')
    # ... and with constrained arguments it is a valid word_count call, whatever the model wanted.
    chat = new_chat(loaded, tools=TOOLS, tool_choice=word_count, constrain_arguments=True)
    constrained = chat.send(call.question)
    constrained.text()
    (forced,) = constrained.result.tool_calls
    assert (
        forced.valid and forced.name == "word_count" and isinstance(forced.arguments["text"], str)
    )
