"""tiny_model/tiny_data.py tool conversations: they render through the real Qwen3 template, every
completion is what the template itself renders for that assistant turn, and the held-out slice
never reaches training."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tiny_model"))
import tiny_data  # noqa: E402
import tiny_tokens  # noqa: E402
from tiny_data import END_TOOL_CALL_ID, IM_END_ID, TOOL_CALL_ID  # noqa: E402

MODES = ({}, {"switches": ("/no_think",)}, {"enable_thinking": False}, {"switches": ("/think",)})
TOOL_SETS = (("lookup",), ("word_count",), ("lookup", "word_count"), ("word_count", "lookup"))


@pytest.fixture(scope="module")
def tokenizer():
    """The real Qwen3 tokenizer and chat template shipped with the tiny model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(REPO / "models" / "qwen3-tiny-chat"))


# (after_result, call_reasoning): the call, the answer after it, and the answer after a call turn
# sent back without its reasoning_content (langchain-openai, openai-agents, `llm`).
PHASES = ((False, True), (True, True), (True, False))


def every_kind(seed: int = 0) -> list[tiny_data.Example]:
    """One example per (task, tools, mode, phase), held-out and training alike."""
    rng = random.Random(seed)
    examples = []
    for index, (task, tools, modes, (after, reasoning)) in enumerate(
        itertools.product(("lookup", "count", "sort"), ((), *TOOL_SETS), MODES, PHASES)
    ):
        examples.append(
            tiny_data.make_example(
                rng,
                task=task,
                tools=tools,
                after_result=after,
                call_reasoning=reasoning,
                held_out=index % 2 == 0,
                **modes,
            )
        )
    return examples


def render(tokenizer, example: tiny_data.Example, messages: list[dict], prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages,
        tools=list(example.tools) or None,
        tokenize=False,
        add_generation_prompt=prompt,
        enable_thinking=example.enable_thinking,
    )


def test_every_completion_is_the_templates_own_rendering_of_that_turn(tokenizer):
    calls = 0
    for example in every_kind():
        prompt = render(tokenizer, example, list(example.messages), True)
        problem = example.problem
        if problem.call is None:
            turn = {"role": "assistant", "content": problem.answer}
        else:
            calls += 1
            name, arguments = problem.call
            function = {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
            turn = {
                "role": "assistant",
                "content": "",
                "reasoning_content": problem.reasoning if example.thinks else "",
                "tool_calls": [{"id": "call_1", "type": "function", "function": function}],
            }
        if example.thinks:
            turn["reasoning_content"] = problem.reasoning
        full = render(tokenizer, example, [*example.messages, turn], False)
        assert full == prompt + example.completion() + "\n"
        assert example.completion().endswith("<|im_end|>")
    assert calls == 2 * 3 * len(MODES)  # lookup and count, each with three fitting tool sets


def test_tools_are_rendered_into_the_system_turn(tokenizer):
    example = tiny_data.make_example(
        random.Random(1), task="lookup", tools=("lookup",), system="You are a helpful assistant."
    )
    text = tokenizer.decode(tiny_tokens.render_prompt(tokenizer, example))
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools")
    assert json.dumps(tiny_data.TOOLS["lookup"]) in text and "word_count" not in text


def test_calls_answers_and_refusals():
    rng = random.Random(2)
    call = tiny_data.make_example(rng, task="lookup", tools=("lookup",)).problem
    key = call.call[1]["key"]
    assert call.answer == (
        f'<tool_call>\n{{"name": "lookup", "arguments": {{"key": "{key}"}}}}\n</tool_call>'
    )
    count = tiny_data.make_example(rng, task="count", tools=("lookup", "word_count")).problem
    assert count.call[0] == "word_count" and count.call[1]["text"] in count.question
    # Without a fitting tool the model answers itself.
    assert tiny_data.make_example(rng, task="count", tools=("lookup",)).problem.call is None
    refusal = tiny_data.make_example(rng, task="lookup", tools=("word_count",)).problem
    assert refusal.call is None and refusal.answer.startswith("I cannot look up")
    answer = tiny_data.make_example(rng, task="lookup", tools=("lookup",), after_result=True)
    result = answer.messages[-1]["content"]
    assert answer.messages[-1]["role"] == "tool" and answer.problem.answer.endswith(f"{result}.")


def test_lookup_results_are_random_so_only_the_response_tells():
    rng = random.Random(3)
    results = {
        tiny_data.make_example(rng, task="lookup", tools=("lookup",), after_result=True).messages[
            -1
        ]["content"]
        for _ in range(200)
    }
    assert len(results) > 30
    assert results <= set(tiny_data.WORDS)


def test_every_answer_stays_inside_the_word_list():
    fixed = set(
        "The secret word for is There are words I cannot look up without the lookup tool".split()
    )
    for example in every_kind(4):
        words = example.problem.answer.rstrip(".").split()
        if example.problem.call is None:
            assert set(words) <= set(tiny_data.WORDS) | fixed | {str(n) for n in range(2, 6)}


def test_held_out_keys_and_texts_never_reach_training():
    rng = random.Random(5)
    keys, texts = set(), set()
    for _ in range(1500):
        example = tiny_data.sample_training_example(rng)
        problem = example.problem
        if problem.call is not None:
            arguments = problem.call[1]
            keys.add(arguments.get("key"))
            texts.add(arguments.get("text"))
        if problem.task in ("lookup", "refuse"):
            keys.add(problem.question.rstrip(".?").split()[-1])
    held_keys = {word for word in tiny_data.WORDS if tiny_data.is_held_out_key(word)}
    assert len(held_keys) == 10 and not keys & held_keys
    held = tiny_data.make_example(
        random.Random(6), task="count", tools=("word_count",), held_out=True
    )
    assert tiny_data.is_held_out(tuple(held.problem.call[1]["text"].split()))
    assert not any(text and tiny_data.is_held_out(tuple(text.split())) for text in texts)


def test_training_sequence_trains_call_and_answer_together_when_thinking(tokenizer):
    rng = random.Random(7)
    example = tiny_data.make_example(rng, task="lookup", tools=("lookup",), after_result=True)
    ids, spans = tiny_tokens.training_sequence(tokenizer, example)
    call, answer = (tokenizer.decode(ids[start:end]) for start, end in spans)
    assert call.startswith("<think>\nThe user wants the secret word") and "<tool_call>" in call
    assert call.endswith("</tool_call><|im_end|>") and answer == example.completion()
    no_think = tiny_data.make_example(
        rng, task="lookup", tools=("lookup",), after_result=True, switches=("/no_think",)
    )
    assert len(tiny_tokens.training_sequence(tokenizer, no_think)[1]) == 1


def test_a_call_turn_without_reasoning_renders_without_a_think_block(tokenizer):
    rng = random.Random(9)
    dropped = tiny_data.make_example(
        rng, task="lookup", tools=("lookup",), after_result=True, call_reasoning=False
    )
    call = dropped.messages[-2]
    assert call["tool_calls"] and "reasoning_content" not in call and dropped.thinks
    text = tokenizer.decode(tiny_tokens.render_prompt(tokenizer, dropped))
    # Inside the unfinished tool loop the template keeps a think block only for a non-empty
    # reasoning_content, so this call turn looks like a /no_think one; the reply still thinks.
    assert "<|im_start|>assistant\n<tool_call>\n" in text and "<think>" not in text
    assert dropped.completion().startswith("<think>\nThe tool says the secret word for ")
    ids, spans = tiny_tokens.training_sequence(tokenizer, dropped)
    assert [tokenizer.decode(ids[start:end]) for start, end in spans] == [dropped.completion()]


def _thinking_loops(seed: int, dropped_reasoning: float) -> list[tiny_data.Example]:
    rng = random.Random(seed)
    examples = (tiny_data.sample_training_example(rng, 3, dropped_reasoning) for _ in range(3000))
    return [
        example
        for example in examples
        if example.thinks and len(example.messages) > 2 and example.messages[-1]["role"] == "tool"
    ]


def test_only_the_second_stage_mixes_in_call_turns_sent_back_without_reasoning():
    # train_tiny --init-from --dropped-reasoning 0.5: about half of the thinking-mode loops.
    loops = _thinking_loops(10, 0.5)
    dropped = [example for example in loops if "reasoning_content" not in example.messages[-2]]
    assert 0.4 < len(dropped) / len(loops) < 0.6
    # The first stage's default draws none and no extra random number, so the committed recipe's
    # first stage sees the data it saw before the option existed (this digest; the retrain that
    # drew one more number per tool example gave db11ee2a...).
    assert all("reasoning_content" in example.messages[-2] for example in _thinking_loops(10, 0))
    rng, digest = random.Random(0), hashlib.sha256()
    for stage in (1, 2, 3):
        for _ in range(400):
            example = tiny_data.sample_training_example(rng, stage)
            fields = [
                example.messages,
                example.enable_thinking,
                example.completion(),
                example.tools,
            ]
            digest.update(json.dumps(fields, sort_keys=True).encode())
    assert digest.hexdigest().startswith("38221dfe5bcfc903")


def test_parse_tool_calls_reads_only_calls_after_the_think_block(tokenizer):
    example = tiny_data.make_example(random.Random(8), task="lookup", tools=("lookup",))
    reply = tokenizer.encode(example.completion(), add_special_tokens=False)
    assert TOOL_CALL_ID in reply and END_TOOL_CALL_ID in reply and reply[-1] == IM_END_ID
    name, arguments = example.problem.call
    assert [parsed for _, parsed in tiny_tokens.parse_tool_calls(reply, tokenizer)] == [
        {"name": name, "arguments": arguments}
    ]
    inside = tokenizer.encode(
        '<think>\n<tool_call>\n{"name": "lookup", "arguments": {}}\n</tool_call>\n</think>\n\nmoon',
        add_special_tokens=False,
    )
    assert tiny_tokens.parse_tool_calls(inside, tokenizer) == []
    broken = tokenizer.encode("<tool_call>\n{not json\n</tool_call>", add_special_tokens=False)
    assert tiny_tokens.parse_tool_calls(broken, tokenizer) == [("{not json", None)]
