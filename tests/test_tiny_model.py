"""The committed tiny Qwen3 chat model behaves like a Qwen3 hybrid-thinking model on its tasks.

Fast subset of tiny_model/eval_tiny.py: greedy replies to held-out prompts (word sequences and lookup
keys never used in training), checked by token id for the think block, tool calls and the stop.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from safetensors import safe_open

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tiny_model"))
import tiny_data  # noqa: E402
import tiny_tokens  # noqa: E402
from tiny_data import END_THINK_ID, IM_END_ID, THINK_ID, TOOL_CALL_ID  # noqa: E402

BF16 = REPO / "models" / "qwen3-tiny-chat"
FOUR_BIT = REPO / "models" / "qwen3-tiny-chat-4bit"
EMPTY_THINK = [THINK_ID, 271, END_THINK_ID, 271]  # "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tokenizer():
    """The real Qwen3 tokenizer and chat template shipped in the model folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(BF16))


@pytest.fixture(scope="module")
def bf16_model():
    """The bf16 checkpoint through mlx-lm."""
    return load(str(BF16))[0]


def first_reply(tokens: Iterable[int]) -> list[int]:
    """The tokens up to and including the first stop token."""
    reply: list[int] = []
    for token in tokens:
        reply.append(token)
        if token in (IM_END_ID, tiny_data.ENDOFTEXT_ID):
            break
    return reply


def greedy(model, prompt: list[int], limit: int = 128) -> list[int]:
    """Greedy reply ids on mlx-lm's generator, up to and including the first stop token."""
    return first_reply(int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=limit))


def greedy_ours(model, prompt: list[int], limit: int = 128) -> list[int]:
    """greedy() on qwen3_mlx's own generator."""
    from qwen3_mlx.cache import make_cache
    from qwen3_mlx.generate import generate_tokens

    steps = generate_tokens(model, prompt, make_cache(model), max_tokens=limit)
    return first_reply(step.token for step in steps)


def held_out(**kwargs) -> list[tiny_data.Example]:
    """One held-out example per task, deterministic."""
    rng = random.Random(7)
    return [
        tiny_data.make_example(rng, held_out=True, task=task, **kwargs) for task in tiny_data.TASKS
    ]


def test_held_out_prompts_are_not_training_data():
    rng = random.Random(0)
    training = {tiny_data.sample_training_example(rng).problem.question for _ in range(3000)}
    assert not training & {example.problem.question for example in held_out()}


def test_bf16_checkpoint_is_plain_tied_qwen3():
    config = json.loads((BF16 / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 151936
    assert config["torch_dtype"] == "bfloat16"
    with safe_open(str(BF16 / "model.safetensors"), "np") as weights:
        names = set(weights.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    template = json.loads((BF16 / "tokenizer_config.json").read_text())["chat_template"]
    assert "enable_thinking" in template and template == (BF16 / "chat_template.jinja").read_text()
    generation = json.loads((BF16 / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [IM_END_ID, tiny_data.ENDOFTEXT_ID]


def test_four_bit_checkpoint_layout():
    config = json.loads((FOUR_BIT / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    with safe_open(str(FOUR_BIT / "model.safetensors"), "np") as weights:
        names = set(weights.keys())
        assert weights.get_slice("model.embed_tokens.weight").get_dtype() == "U32"
    assert {"model.embed_tokens.scales", "model.embed_tokens.biases"} <= names
    assert "model.layers.0.self_attn.q_proj.scales" in names and "lm_head.weight" not in names


def test_thinking_mode_reasons_then_answers(tokenizer, bf16_model):
    for example in held_out():
        reply = greedy(bf16_model, tiny_tokens.render_prompt(tokenizer, example))
        assert reply[0] == THINK_ID and reply.count(END_THINK_ID) == 1
        think_ids = reply[1 : reply.index(END_THINK_ID)]
        assert tokenizer.decode(think_ids).strip(), "think block must not be empty"
        assert reply[-1] == IM_END_ID
        assert tiny_tokens.answer_text(tokenizer, reply) == example.problem.answer


def test_no_think_switch_gives_empty_think_block(tokenizer, bf16_model):
    for example in held_out(switches=("/no_think",)):
        reply = greedy(bf16_model, tiny_tokens.render_prompt(tokenizer, example))
        assert reply[:4] == EMPTY_THINK and reply[-1] == IM_END_ID
        assert tiny_tokens.answer_text(tokenizer, reply) == example.problem.answer


def test_enable_thinking_false_reply_has_no_think_tokens(tokenizer, bf16_model):
    for example in held_out(enable_thinking=False):
        prompt = tiny_tokens.render_prompt(tokenizer, example)
        assert prompt[-4:] == EMPTY_THINK  # the template supplies the empty block
        reply = greedy(bf16_model, prompt)
        assert THINK_ID not in reply and END_THINK_ID not in reply and reply[-1] == IM_END_ID
        assert tokenizer.decode(reply[:-1]).strip() == example.problem.answer


@pytest.mark.parametrize(
    ("switches", "thinks"),
    [(("/no_think", None, "/think"), True), (("/think", "/no_think", None), False)],
)
def test_latest_soft_switch_wins_over_three_turns(tokenizer, bf16_model, switches, thinks):
    example = tiny_data.make_example(
        random.Random(3), held_out=True, turns=3, switches=switches, task="reverse"
    )
    reply = greedy(bf16_model, tiny_tokens.render_prompt(tokenizer, example))
    assert (reply[:4] != EMPTY_THINK) == thinks and reply[0] == THINK_ID
    assert tiny_tokens.answer_text(tokenizer, reply) == example.problem.answer


def tool_examples(**modes) -> list[tiny_data.Example]:
    """Held-out lookup and word_count questions with the tool given: the call, then the answer."""
    rng = random.Random(11)
    return [
        tiny_data.make_example(
            rng, held_out=True, task=task, tools=tools, after_result=after_result, **modes
        )
        for task, tools in (("lookup", ("lookup",)), ("count", ("lookup", "word_count")))
        for after_result in (False, True)
    ]


def replies_right(tokenizer, model, examples: list[tiny_data.Example], decode=greedy) -> list[bool]:
    """Per example: the exact call (parsed arguments), or the exact answer and no call."""
    right = []
    for example in examples:
        reply = decode(model, tiny_tokens.render_prompt(tokenizer, example))
        calls = [parsed for _, parsed in tiny_tokens.parse_tool_calls(reply, tokenizer)]
        if example.problem.call is not None:
            name, arguments = example.problem.call
            ok = calls == [{"name": name, "arguments": arguments}]
        else:
            ok = not calls and tiny_tokens.answer_text(tokenizer, reply) == example.problem.answer
        right.append(ok and reply[-1] == IM_END_ID)
    return right


@pytest.mark.parametrize(
    "modes", [{}, {"switches": ("/no_think",)}, {"enable_thinking": False}], ids=str
)
def test_calls_a_fitting_tool_then_answers_from_its_result(tokenizer, bf16_model, modes):
    assert all(replies_right(tokenizer, bf16_model, tool_examples(**modes)))


def test_answers_after_a_call_turn_sent_back_without_reasoning(tokenizer, bf16_model):
    """Thinking mode, the call turn without reasoning_content (langchain-openai, openai-agents and
    `llm` send it so; the template then renders it with no think block): the reply still thinks,
    then answers from the result."""
    rng = random.Random(13)
    tool_sets = (("lookup",), ("word_count",), ("word_count", "lookup"), ("lookup", "word_count"))
    examples = [
        tiny_data.make_example(
            rng, held_out=True, task=task, tools=tools, after_result=True, call_reasoning=False
        )
        for task, tools in zip(("lookup", "count", "lookup", "count"), tool_sets, strict=True)
    ]
    assert all(replies_right(tokenizer, bf16_model, examples))
    for example in examples:
        reply = greedy(bf16_model, tiny_tokens.render_prompt(tokenizer, example))
        think_ids, _ = tiny_tokens.split_reply(reply)
        assert reply[0] == THINK_ID and tokenizer.decode(think_ids).strip()


def test_answers_directly_when_no_tool_fits_or_none_is_given(tokenizer, bf16_model):
    rng = random.Random(12)
    examples = [
        tiny_data.make_example(rng, held_out=True, task="lookup"),
        tiny_data.make_example(rng, held_out=True, task="count", tools=("lookup",)),
        tiny_data.make_example(
            rng, held_out=True, task="sort", tools=("word_count", "lookup"), switches=("/no_think",)
        ),
        tiny_data.make_example(
            rng, held_out=True, task="lookup", tools=("word_count",), enable_thinking=False
        ),
    ]
    assert all(replies_right(tokenizer, bf16_model, examples))
    for example in held_out():
        assert TOOL_CALL_ID not in greedy(bf16_model, tiny_tokens.render_prompt(tokenizer, example))


def test_four_bit_model_still_answers(tokenizer):
    """On our own loader and kernels: mlx-lm loads our 4-bit folders to equal logits
    (test_quantize.py), and its CPU quantized matmul took 31 s here for the 151,936-row head."""
    from qwen3_mlx.loading import load_model

    model = load_model(FOUR_BIT)[0]
    examples = held_out(switches=("/no_think",)) + held_out()[:2]
    right = [
        tiny_tokens.answer_text(
            tokenizer, greedy_ours(model, tiny_tokens.render_prompt(tokenizer, e))
        )
        == e.problem.answer
        for e in examples
    ]
    assert sum(right) >= len(examples) - 1
    right = replies_right(
        tokenizer, model, tool_examples() + tool_examples(switches=("/no_think",)), greedy_ours
    )
    assert sum(right) >= len(right) - 1


def test_transformers_greedy_matches_mlx_lm(tokenizer, bf16_model):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(BF16), dtype=torch.float32).eval()
    for example in held_out()[:2]:
        prompt = tiny_tokens.render_prompt(tokenizer, example)
        with torch.no_grad():
            output = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=64,
                do_sample=False,
                eos_token_id=[IM_END_ID, tiny_data.ENDOFTEXT_ID],
                pad_token_id=tiny_data.ENDOFTEXT_ID,
            )
        assert output[0, len(prompt) :].tolist() == greedy(bf16_model, prompt)
