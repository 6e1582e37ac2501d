"""Prefix-cache reuse with a real (random-weight) Qwen3 model: over an 8-turn conversation, with
switches, a system change, undo and retry, each turn's greedy tokens equal those of a fresh full
prefill, and only the suffix after the shared prefix is run through the model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import pytest
from chat_fakes import load_fixture_tokenizer

from qwen3_mlx.cache import PromptCache, common_prefix_length, make_cache
from qwen3_mlx.chat import Chat
from qwen3_mlx.engine import render_prompt
from qwen3_mlx.generate import generate_tokens
from qwen3_mlx.generation_config import GenerationConfig
from qwen3_mlx.loading import load_model
from qwen3_mlx.stream import ReplyStream
from qwen3_mlx.thinking import prompt_phase

pytestmark = pytest.mark.filterwarnings("ignore::qwen3_mlx.settings.GreedyThinkingWarning")
MAX_TOKENS = 6


def fresh_reply(chat: Chat, prompt: list[int]) -> tuple[list[int], str, str]:
    """Greedy tokens, answer and thinking from a brand-new cache holding nothing."""
    tokens = [
        t.token
        for t in generate_tokens(chat.model, prompt, make_cache(chat.model), max_tokens=MAX_TOKENS)
    ]
    stop = set(chat.generation_config.eos_token_ids)
    if any(t in stop for t in tokens):
        tokens = tokens[: next(i for i, t in enumerate(tokens) if t in stop) + 1]
    stream = ReplyStream(chat.tokenizer, prompt_phase(prompt), stop)
    list(stream.run(_timed(tokens)))
    result = stream.result(len(prompt), len(prompt))
    return tokens, result.answer, result.thinking


def _timed(tokens: list[int]):
    from qwen3_mlx.generate import GeneratedToken

    return (GeneratedToken(t, 0.0) for t in tokens)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> object:
    from checkpoints import make_checkpoint

    # Untied: with tied embeddings a random model mostly repeats its input token under greedy.
    folder = make_checkpoint(
        tmp_path_factory.mktemp("ckpt"),
        tokenizer="qwen3-4b",
        dtype="float32",
        seed=7,
        tie_word_embeddings=False,
    )
    loaded, _ = load_model(Path(folder), compute_dtype="float32")
    return loaded


def test_reuse_equals_fresh_prefill_over_eight_turns(model: object) -> None:
    tokenizer = load_fixture_tokenizer("qwen3-4b")
    chat = Chat(
        model,
        tokenizer,
        GenerationConfig(),
        system="You are terse.",
        sampling={"temperature": 0, "max_tokens": MAX_TOKENS},
    )
    actions: list[Callable[[], object]] = [
        lambda: chat.send("Add 2 and 3."),
        lambda: chat.send("Reverse: moon star /no_think"),
        lambda: chat.send("Sort: cake apple bell"),
        lambda: (setattr(chat, "thinking", False), chat.send("Count: a b c"))[1],
        lambda: (setattr(chat, "system", "Be kind."), chat.send("Copy: frog"))[1],
        lambda: (chat.undo(), chat.send("What is 7 + 8? /think"))[1],
        lambda: chat.retry(),
        lambda: (setattr(chat, "thinking", True), chat.send("日本語 🦜 unicode turn"))[1],
    ]
    reused_somewhere = 0
    for index, action in enumerate(actions):
        cached_before = chat.cache.tokens
        reply = action()
        list(reply)
        result = reply.result
        prompt = render_prompt(tokenizer, chat.messages[:-1], thinking=chat.thinking)
        tokens, answer, thinking = fresh_reply(chat, prompt)

        assert result.prompt_tokens == len(prompt)
        shared = min(common_prefix_length(cached_before, prompt), len(prompt) - 1)
        assert result.prefilled_tokens == len(prompt) - shared, index
        reused_somewhere += shared > 0
        # The reply with reuse equals the reply from a fresh full prefill, token for token ...
        generated = chat.cache.tokens[len(prompt) :]
        assert chat.cache.tokens[: len(prompt)] == prompt
        assert generated == tokens[: len(generated)] and len(generated) >= len(tokens) - 1, index
        # ... and so in text (covering the last token, which the cache never ran).
        assert (result.answer, result.thinking) == (answer, thinking), index
        assert result.generated_tokens == len(tokens)
    assert reused_somewhere >= 6
    assert len(chat.turns) == 6


def test_trimmed_cache_gives_the_same_logits_as_a_fresh_one(model: object) -> None:
    tokenizer = load_fixture_tokenizer("qwen3-4b")
    first = render_prompt(
        tokenizer, [{"role": "user", "content": "First question, fairly long text."}]
    )
    second = render_prompt(
        tokenizer,
        [
            {"role": "user", "content": "First question, fairly long text."},
            {"role": "assistant", "content": "An answer."},
            {"role": "user", "content": "Second."},
        ],
    )
    cache = PromptCache(model)
    model(mx.array([first + [1, 2, 3, 4, 5]]), cache=cache.cache)  # a prompt plus a reply
    cache.settle(first + [1, 2, 3, 4, 5])
    reused = cache.reuse(second)
    assert 0 < reused < len(second) and cache.tokens == second[:reused]
    with_reuse = model(mx.array([second[reused:]]), cache=cache.cache)[0, -1]
    fresh = model(mx.array([second]), cache=make_cache(model))[0, -1]
    assert mx.allclose(with_reuse, fresh, atol=1e-4, rtol=1e-4).item()


def test_from_pretrained_and_yarn_as_a_runtime_option(tmp_path: Path) -> None:
    from checkpoints import make_checkpoint

    from qwen3_mlx.config import yarn_scaling

    folder = make_checkpoint(tmp_path / "m", tokenizer="qwen3-4b", max_position_embeddings=4096)
    config_before = (folder / "config.json").read_bytes()
    plain = Chat.from_pretrained(str(folder), sampling={"max_tokens": 3})
    assert plain.model_id == str(folder) and plain.context_limit == 4096
    assert plain.settings.max_tokens == 3 and plain.thinking
    stretched = Chat.from_pretrained(
        str(folder), rope_scaling=yarn_scaling(4.0), system="S", sampling={"max_tokens": 3}
    )
    assert stretched.context_limit == 4 * 32_768 and stretched.system == "S"
    assert (folder / "config.json").read_bytes() == config_before  # no config.json edit
    reply = stretched.send("hi")
    reply.text()
    result = reply.result
    assert result.prompt_tokens > 0 and result.generated_tokens > 0
