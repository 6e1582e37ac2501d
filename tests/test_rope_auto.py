"""YaRN only when needed (`--rope-scaling auto`), on a random model whose trained window is 256.

Below the window the logits are the native model's; a reply that passes it switches to YaRN
factor 2 once, prefills again, and from then on its logits are those of a static-YaRN model fed
the same tokens. A later turn reuses the re-prefilled cache; a new conversation starts native.
"""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np
import pytest

from qwen3_mlx.cache import PromptCache
from qwen3_mlx.chat import Chat
from qwen3_mlx.config import ModelArgs, yarn_scaling
from qwen3_mlx.engine import start_reply
from qwen3_mlx.loading import load
from qwen3_mlx.model import Model
from qwen3_mlx.rope_auto import RopeAuto, switch
from qwen3_mlx.settings import Sampling
from tests.checkpoints import make_checkpoint, tiny_config

WINDOW = 256
PROMPT = 200
GENERATED = 120  # crosses the window after WINDOW - PROMPT + 1 = 57 tokens


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_checkpoint(
        tmp_path_factory.mktemp("rope") / "m",
        dtype="float32",
        tokenizer="qwen3-4b",
        max_position_embeddings=WINDOW,
    )


def run_reply(model, tokenizer, generation, plan, prompt, notices):
    """Greedy reply through the engine; return (tokens, logits of each step, result)."""
    rows: list[np.ndarray] = []

    def record(previous, logits):
        rows.append(np.array(logits[0].astype(mx.float32)))
        return logits

    settings = Sampling.for_mode(generation, False, {"temperature": 0.0, "max_tokens": GENERATED})
    reply = start_reply(
        model,
        tokenizer,
        PromptCache(model),
        prompt,
        settings,
        stop_ids=(),
        context_limit=plan.limit if plan else model.args.context_length,
        repetition_guard=None,
        extra_processors=[record],
        rope=plan,
        on_notice=notices.append,
    )
    for _ in reply:
        pass
    return list(reply.tokens), np.stack(rows), reply.result


def forced_logits(model, tokens: list[int]) -> np.ndarray:
    """Logits at every position of one full forward pass (no cache)."""
    return np.array(model(mx.array(tokens)[None])[0].astype(mx.float32))


def test_a_reply_that_passes_the_window_switches_once_and_matches_static_yarn(folder):
    model, tokenizer, generation = load(folder, compute_dtype="float32")
    plan = RopeAuto.for_model(model.args)
    assert (plan.original, plan.factors, plan.limit) == (WINDOW, (2.0, 4.0), 4 * WINDOW)
    rng = random.Random(0)
    prompt = [rng.randrange(200, 5000) for _ in range(PROMPT)]
    notices: list[str] = []
    tokens, logits, result = run_reply(model, tokenizer, generation, plan, prompt, notices)

    assert len(tokens) == GENERATED and result.finish_reason == "length"
    assert plan.factor == 2.0 and plan.switches == 1 and len(notices) == 1
    assert "256" in notices[0] and "factor 2" in notices[0]
    assert model.args.rope_scaling["factor"] == 2.0
    # A switch re-prefills: the prompt counts as prefilled in full.
    assert result.prefilled_tokens == PROMPT

    sequence = prompt + tokens[:-1]  # the inputs of every step
    steps = slice(PROMPT - 1, None)
    native, _, _ = load(folder, compute_dtype="float32")
    static, _, _ = load(folder, compute_dtype="float32", rope_scaling=yarn_scaling(2, WINDOW))
    native_logits = forced_logits(native, sequence)[steps]
    static_logits = forced_logits(static, sequence)[steps]
    switched = WINDOW - PROMPT + 1  # steps run natively: their last input sits at WINDOW - 1
    scale = np.abs(native_logits).max()
    np.testing.assert_allclose(logits[:switched], native_logits[:switched], atol=1e-4 * scale)
    np.testing.assert_allclose(logits[switched:], static_logits[switched:], atol=1e-4 * scale)
    # The two references really differ, so the comparison above tells them apart.
    assert np.abs(native_logits - static_logits).max() > 100 * 1e-4 * scale


def test_below_the_window_auto_is_the_native_model(folder):
    model, tokenizer, generation = load(folder, compute_dtype="float32")
    plan = RopeAuto.for_model(model.args)
    prompt = [random.Random(1).randrange(200, 5000) for _ in range(40)]
    auto = run_reply(model, tokenizer, generation, plan, prompt, notices := [])
    native = run_reply(model, tokenizer, generation, None, prompt, [])
    assert plan.factor is None and not notices
    assert auto[0] == native[0]
    np.testing.assert_array_equal(auto[1], native[1])


def test_a_conversation_switches_at_the_turn_that_passes_and_then_reuses_the_cache(folder):
    model, tokenizer, generation = load(folder, compute_dtype="float32")
    chat = Chat(
        model,
        tokenizer,
        generation,
        thinking=False,
        sampling={"temperature": 0.0, "max_tokens": 8},
        repetition_guard=None,
        auto_rope=True,
    )
    notices: list[str] = []
    chat.on_notice = notices.append
    assert chat.context_limit == 4 * WINDOW

    first = chat.send("hello there")
    list(first)
    assert chat.rope_plan.factor is None and not notices

    second = chat.send(" ".join(["word"] * 300))  # the prompt alone passes 256 tokens
    list(second)
    assert second.result.prompt_tokens > WINDOW
    assert chat.rope_plan.factor == 2.0 and len(notices) == 1
    assert second.result.prefilled_tokens == second.result.prompt_tokens  # prefilled once more

    third = chat.send("and one more")
    list(third)
    assert chat.rope_plan.factor == 2.0 and len(notices) == 1
    # Only the new turn is prefilled (plus the few tokens where the template renders a past
    # non-thinking reply differently from the prompt that asked for it), not the conversation.
    new_tokens = third.result.prompt_tokens - second.result.prompt_tokens
    assert third.result.prefilled_tokens <= new_tokens + 8

    chat.reset()  # a new conversation starts native again
    assert chat.rope_plan.factor is None and model.args.rope_scaling is None


def test_a_saved_cache_after_a_switch_restores_with_its_rope(folder, tmp_path):
    model, tokenizer, generation = load(folder, compute_dtype="float32")
    options = dict(thinking=False, sampling={"temperature": 0.0, "max_tokens": 8}, auto_rope=True)
    chat = Chat(model, tokenizer, generation, repetition_guard=None, **options)
    first = chat.send(" ".join(["word"] * 300))
    list(first)
    assert chat.rope_plan.factor == 2.0
    chat.save(tmp_path / "conv.json", with_cache=True)
    saved_tokens = list(chat.cache.tokens)

    other, _, _ = load(folder, compute_dtype="float32")
    resumed = Chat(other, tokenizer, generation, repetition_guard=None, **options)
    assert resumed.rope_plan.factor is None
    note = resumed.load(tmp_path / "conv.json")
    assert note.startswith("restored"), note
    assert resumed.rope_plan.factor == 2.0 and resumed.cache.tokens == saved_tokens
    reply = resumed.send("next")
    list(reply)
    # The saved prompt is not prefilled again (a random model's answer may re-tokenize apart).
    new_tokens = reply.result.prompt_tokens - first.result.prompt_tokens
    assert reply.result.prefilled_tokens <= new_tokens + 8


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"max_position_embeddings": 40_960}, (32_768, (2.0, 4.0))),  # Qwen3-4B
        ({"max_position_embeddings": 262_144}, None),  # Thinking-2507: never switches
        (
            {
                "rope_scaling": {
                    "rope_type": "yarn",
                    "factor": 8.0,
                    "original_max_position_embeddings": 300,
                }
            },
            (300, (2.0, 4.0, 8.0)),
        ),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 1.0}}, None),
    ],
)
def test_the_plan_follows_the_config(config, expected):
    model = Model(ModelArgs.from_dict(tiny_config(**config)))
    plan = RopeAuto.for_model(model.args)
    assert (plan.original, plan.factors) == expected if expected else plan is None
    if plan is not None:
        switch(model, plan, None)  # a config that carries YaRN still starts native under auto
        assert model.args.rope_scaling is None
        assert model.layers[0].self_attn.rope.attention_factor == 1.0
        switch(model, plan, plan.factors[0])
        assert model.args.rope_scaling["factor"] == plan.factors[0]
        assert model.layers[-1].self_attn.rope.attention_factor > 1.0
