"""tool_choice (none, required, a named function) and schema-constrained arguments: on the
logits processors directly, on a scripted fake that is tempted to call, and on a random model
whose sampled calls must validate against their JSON schema (jsonschema) every time."""

from __future__ import annotations

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from chat_fakes import VOCAB, ScriptedModel, load_fixture_tokenizer
from checkpoints import make_checkpoint

from qwen3_mlx.chat import Chat
from qwen3_mlx.generation_config import GenerationConfig
from qwen3_mlx.thinking import TOOL_CALL_END_ID, TOOL_CALL_START_ID, Phase
from qwen3_mlx.tool_choice import NEWLINE_IDS, ToolCallGuide, ban_tool_calls

pytestmark = pytest.mark.filterwarnings("ignore::qwen3_mlx.settings.GreedyThinkingWarning")

PICK = {
    "type": "function",
    "function": {
        "name": "pick",
        "description": "Pick a colour and a size.",
        "parameters": {
            "type": "object",
            "properties": {
                "colour": {"enum": ["red", "green", "blue"]},
                "size": {"type": "integer", "minimum": 1, "maximum": 9},
                "exact": {"type": "boolean"},
                "note": {"type": "string", "maxLength": 6},
            },
            "required": ["colour", "size"],
            "additionalProperties": False,
        },
    },
}
MOVE = {
    "type": "function",
    "function": {
        "name": "move",
        "description": "Move by a number of steps.",
        "parameters": {
            "type": "object",
            "properties": {"steps": {"type": "integer", "minimum": -5, "maximum": 5}},
            "required": ["steps"],
            "additionalProperties": False,
        },
    },
}


def allowed(logits: mx.array) -> set[int]:
    return set(np.flatnonzero(np.isfinite(np.array(logits[0]))).tolist())


def test_none_masks_the_call_tokens_only() -> None:
    logits = ban_tool_calls(None, mx.zeros((1, VOCAB)))
    assert allowed(logits) == set(range(VOCAB)) - {TOOL_CALL_START_ID, TOOL_CALL_END_ID}


def test_required_opens_a_call_after_at_most_two_newlines_then_lets_go() -> None:
    guide = ToolCallGuide(Phase.ANSWER, force="required")
    zeros = mx.zeros((1, VOCAB))
    assert allowed(guide(None, zeros)) == {TOOL_CALL_START_ID, *NEWLINE_IDS}
    assert allowed(guide(mx.array([198]), zeros)) == {TOOL_CALL_START_ID, 198}  # "\n" once more
    assert allowed(guide(mx.array([198]), zeros)) == {TOOL_CALL_START_ID}
    other = ToolCallGuide(Phase.ANSWER, force="required")
    other(None, zeros)
    assert allowed(other(mx.array([271]), zeros)) == {TOOL_CALL_START_ID}  # "\n\n": enough
    assert len(allowed(guide(mx.array([TOOL_CALL_START_ID]), zeros))) == VOCAB  # inside: free


def test_required_waits_for_the_think_block_to_close() -> None:
    guide = ToolCallGuide(Phase.THINKING, force="required")
    zeros = mx.zeros((1, VOCAB))
    assert len(allowed(guide(None, zeros))) == VOCAB  # thinking is free
    assert allowed(guide(mx.array([151668]), zeros)) == {TOOL_CALL_START_ID, *NEWLINE_IDS}


def test_a_named_choice_writes_the_call_prefix() -> None:
    prefix = [1, 2, 3]
    guide = ToolCallGuide(Phase.ANSWER, force="move", prefix=prefix)
    zeros = mx.zeros((1, VOCAB))
    guide(None, zeros)
    forced = [allowed(guide(mx.array([TOOL_CALL_START_ID]), zeros))]
    for token in prefix[:-1]:
        forced.append(allowed(guide(mx.array([token]), zeros)))
    assert forced == [{1}, {2}, {3}]
    assert len(allowed(guide(mx.array([3]), zeros))) == VOCAB


class TemptedModel(ScriptedModel):
    """The scripted reply, but <tool_call> always scores higher: only a mask keeps it out."""

    def __call__(self, inputs: mx.array, cache: list) -> mx.array:
        logits = np.array(super().__call__(inputs, cache))
        logits[..., TOOL_CALL_START_ID] = 5.0
        return mx.array(logits)


def test_none_holds_against_a_model_that_wants_to_call() -> None:
    tokenizer = load_fixture_tokenizer("qwen3-4b")
    script = "<think>\nNo call.\n</think>\n\nFine.<|im_end|>"
    chat = Chat(
        TemptedModel(tokenizer, script),
        tokenizer,
        GenerationConfig(),
        tools=[PICK],
        tool_choice="none",
        sampling={"temperature": 0.0},
    )
    reply = chat.send("hello")
    assert reply.text() == "Fine." and reply.result.tool_calls == ()
    # The tools are still in the prompt: the cache prefix does not depend on tool_choice.
    assert "pick" in chat.tokenizer.decode(chat.cache.tokens)


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory):
    from qwen3_mlx.loading import load

    folder = make_checkpoint(tmp_path_factory.mktemp("tools") / "random", tokenizer="qwen3-4b")
    return load(folder)


def random_chat(random_model, **kwargs) -> Chat:
    model, tokenizer, generation_config = random_model
    kwargs.setdefault("sampling", {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "max_tokens": 40})
    return Chat(model, tokenizer, generation_config, thinking=False, **kwargs)


def generated(chat: Chat, reply) -> list[int]:
    return chat.cache.tokens[reply.result.prompt_tokens :]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_and_named_hold_on_a_random_model(random_model, seed: int) -> None:
    chat = random_chat(random_model, tools=[PICK, MOVE], tool_choice="required")
    chat.set("seed", seed)
    reply = chat.send("Do something.")
    reply.text()
    tokens = generated(chat, reply)
    start = tokens.index(TOOL_CALL_START_ID)
    assert chat.tokenizer.decode(tokens[:start]) in ("", "\n", "\n\n")
    assert reply.result.tool_calls  # the random body may be invalid: required only opens it
    chat = random_chat(
        random_model,
        tools=[PICK, MOVE],
        tool_choice={"type": "function", "function": {"name": "move"}},
    )
    chat.set("seed", seed)
    reply = chat.send("Move.")
    reply.text()
    body = chat.tokenizer.decode(generated(chat, reply))
    assert '<tool_call>\n{"name": "move", "arguments": ' in body


def test_every_constrained_call_validates_against_its_schema(random_model) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (PICK, MOVE)}
    chat = random_chat(
        random_model,
        tools=[PICK, MOVE],
        tool_choice="required",
        constrain_arguments=True,
        parallel_tool_calls=False,
    )
    counts = {"pick": 0, "move": 0}
    for seed in range(100):
        chat.reset()
        chat.set("seed", seed)
        reply = chat.send("Pick or move.")
        reply.text()
        (call,) = reply.result.tool_calls
        assert reply.result.finish_reason == "tool_calls"  # one call, then the reply ended
        assert call.valid, call.describe()
        jsonschema.validate(call.arguments, schemas[call.name])
        # Written with Qwen3's own separators, as the template renders calls back.
        assert ": " in call.arguments_text and '":' not in call.arguments_text.replace('": ', "")
        counts[call.name] += 1
    assert min(counts.values()) > 0  # both tools were chosen by the sampler


def test_objects_with_properties_are_closed_unless_the_schema_says_otherwise() -> None:
    """A missing additionalProperties is false (llama.cpp's reading), at every depth; an object
    without properties, or one that says true, stays open."""
    from qwen3_mlx.tool_choice import closed_objects

    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "object", "properties": {"b": {"type": "string"}}},
            "list": {"type": "array", "items": {"properties": {"c": {}}}},
            "any": {"type": "object"},
            "open": {"properties": {"d": {}}, "additionalProperties": True},
        },
        "$defs": {"e": {"anyOf": [{"properties": {"f": {}}}, {"type": "string"}]}},
    }
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["list"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["properties"]["any"]
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["$defs"]["e"]["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the client's schema (and prompt) unchanged
