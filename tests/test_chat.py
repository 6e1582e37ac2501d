"""The Chat session driven by a scripted fake model: think/answer events, switches, history,
stop rules, interrupts, undo/retry/reset, context limits and cache bookkeeping.

The fake reads its context back from the KV cache, so every reply also checks that the cache holds
exactly the tokens the session believes it holds (see chat_fakes.py).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
from chat_fakes import ScriptedModel, load_fixture_tokenizer

from qwen3_mlx.chat import Chat
from qwen3_mlx.engine import prepare_prompt, render_prompt
from qwen3_mlx.errors import ContextOverflowError, HistoryError, SettingsError, TemplateError
from qwen3_mlx.events import AnswerText, ThinkingText, TurnResult
from qwen3_mlx.generation_config import GenerationConfig
from qwen3_mlx.history import Turn
from qwen3_mlx.limits import MAX_TOKEN_BYTES
from qwen3_mlx.settings import GreedyThinkingWarning
from qwen3_mlx.stream import RepetitionGuard

EMPTY_BLOCK = "<think>\n\n</think>\n\n"
# The fake's logits leave one choice, so greedy picks the same tokens as sampling would; it skips
# the full-vocabulary sort that top_p costs on the CPU. Tests about presets pass sampling={}.
GREEDY = {"temperature": 0}
pytestmark = pytest.mark.filterwarnings("ignore::qwen3_mlx.settings.GreedyThinkingWarning")


def thinking_script(user: str) -> str:
    """Reason, then answer; follow /no_think with the empty block, like Qwen3 does."""
    if "/no_think" in user:
        return f"{EMPTY_BLOCK}Short: {user.split()[0]}<|im_end|>"
    return f"<think>\nThe user said {user.split()[0]}.\n</think>\n\nAnswer to {user.split()[0]}.<|im_end|>"


def make_chat(
    script=thinking_script, variant: str = "qwen3-4b", **kwargs
) -> tuple[Chat, ScriptedModel]:
    tokenizer = load_fixture_tokenizer(variant)
    model = ScriptedModel(tokenizer, script, context_length=kwargs.pop("context_length", 4096))
    kwargs.setdefault("sampling", GREEDY)
    return Chat(model, tokenizer, GenerationConfig(), **kwargs), model


def cached_ids(chat: Chat) -> list[int]:
    """What the fake's KV cache really holds (token ids stored as keys)."""
    cache = chat.cache.cache
    if cache[0].offset == 0:
        return []
    keys, _ = cache[0].keys_and_values()
    return [int(t) for t in keys.reshape(-1).tolist()]


def assert_consistent(chat: Chat) -> None:
    """The cache holds what the session believes: the last prompt, then the reply's tokens."""
    assert cached_ids(chat) == chat.cache.tokens
    assert all(layer.offset == len(chat.cache.tokens) for layer in chat.cache.cache)
    if chat.turns:
        prompt = render_prompt(chat.tokenizer, chat.messages[:-1], thinking=chat.thinking)
        # An interrupt during prefill leaves only part of the prompt in the cache.
        shared = len(prompt)
        if chat.turns[-1].interrupted:
            shared = min(shared, len(chat.cache.tokens))
        assert chat.cache.tokens[:shared] == prompt[:shared]


def run(chat: Chat, text: str) -> tuple[list, TurnResult]:
    reply = chat.send(text)
    events = list(reply)
    assert isinstance(reply.result, TurnResult)
    assert all(isinstance(e, ThinkingText | AnswerText) for e in events)
    assert list(reply) == []  # a finished reply holds nothing back
    return events, reply.result


def texts(events: list, kind: type) -> str:
    return "".join(e.text for e in events if isinstance(e, kind))


def test_a_thinking_turn_streams_thinking_then_answer() -> None:
    chat, _ = make_chat()
    events, result = run(chat, "apple please")
    kinds = [type(e) for e in events]
    assert kinds.index(AnswerText) > max(i for i, k in enumerate(kinds) if k is ThinkingText)
    assert texts(events, ThinkingText) == result.thinking == "The user said apple."
    assert texts(events, AnswerText) == result.answer == "Answer to apple."
    assert result.finish_reason == "stop" and result.thinking_finished
    assert result.thinking_tokens == len(chat.tokenizer.encode("\nThe user said apple.\n"))
    assert (
        result.prompt_tokens
        == result.prefilled_tokens
        == len(chat.cache.tokens) - result.generated_tokens
    )
    assert result.time_to_first_token > 0 and result.peak_memory_gb > 0
    assert_consistent(chat)


def test_history_keeps_answers_only_and_thinking_apart() -> None:
    chat, model = make_chat(system="Be brief.")
    run(chat, "apple")
    run(chat, "pear")
    assert chat.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "apple"},
        {"role": "assistant", "content": "Answer to apple."},
        {"role": "user", "content": "pear"},
        {"role": "assistant", "content": "Answer to pear."},
    ]
    assert [t.thinking for t in chat.turns] == ["The user said apple.", "The user said pear."]
    assert not any(t.interrupted for t in chat.turns)
    # The second prompt fed the model the first answer, never its thinking.
    second_prompt = render_prompt(chat.tokenizer, chat.messages[:4])
    assert model.contexts[-1][: len(second_prompt)] == second_prompt
    assert "The user said apple" not in chat.tokenizer.decode(second_prompt)


def test_second_turn_prefills_only_the_answer_and_the_new_message() -> None:
    chat, model = make_chat()
    _, first = run(chat, "apple")
    _, second = run(chat, "pear")
    tokenizer = chat.tokenizer
    # Shared: the first prompt (up to "<|im_start|>assistant\n"); new: answer, end, new user turn.
    suffix = tokenizer.encode(
        "Answer to apple.<|im_end|>\n<|im_start|>user\npear<|im_end|>\n<|im_start|>assistant\n"
    )
    assert second.prompt_tokens == first.prompt_tokens + len(suffix)
    assert second.prefilled_tokens == len(suffix)
    assert (
        model.fed.count(len(suffix) - 1) >= 1
    )  # prefill ran just those tokens (the last one steps)
    assert_consistent(chat)


def test_soft_switch_no_think_gives_an_empty_block_and_the_plain_preset() -> None:
    chat, _ = make_chat(sampling={})
    events, result = run(chat, "kiwi /no_think")
    assert result.thinking == "" and result.answer == "Short: kiwi"
    assert not any(isinstance(e, ThinkingText) for e in events)
    assert chat.settings.temperature == 0.7  # the latest switch is /no_think
    run(chat, "plum /think")
    assert chat.settings.temperature == 0.6
    assert chat.messages[0]["content"] == "kiwi /no_think"  # passed through unchanged


def test_hard_switch_off_renders_the_empty_block_in_the_prompt() -> None:
    chat, model = make_chat(
        lambda u: f"{EMPTY_BLOCK}Plain {u}.<|im_end|>", thinking=False, sampling={}
    )
    events, result = run(chat, "fig")
    assert result.answer == "Plain fig." and result.thinking == ""
    prompt_text = chat.tokenizer.decode(chat.cache.tokens[: result.prompt_tokens])
    assert prompt_text.endswith("<|im_start|>assistant\n" + EMPTY_BLOCK)
    assert chat.settings.top_p == 0.8
    chat.thinking = True  # switching back changes only the next generation prompt
    assert chat.settings.top_p == 0.95


def test_explicit_setting_survives_a_mode_switch() -> None:
    chat, _ = make_chat(sampling={})
    chat.set("temperature", 0.4)
    chat.thinking = False
    assert chat.settings.temperature == 0.4 and chat.settings.top_p == 0.8
    chat.unset("temperature")
    assert chat.settings.temperature == 0.7
    with pytest.raises(SettingsError, match="top_k"):
        chat.set("top_k", -3)
    with pytest.raises(SettingsError):
        chat.unset("nonsense")


def test_thinking_2507_parses_a_reply_that_only_closes_think() -> None:
    # The prompt opens "<think>\n"; the model writes the reasoning, then </think>.
    chat, model = make_chat(
        lambda u: f"<think>\nPondering {u}.\n</think>\n\nDone.<|im_end|>",
        variant="qwen3-4b-thinking-2507",
    )
    events, result = run(chat, "grape")
    assert result.thinking == "Pondering grape." and result.answer == "Done."
    prompt_text = chat.tokenizer.decode(chat.cache.tokens[: result.prompt_tokens])
    assert prompt_text.endswith("assistant\n<think>\n")
    with pytest.raises(TemplateError, match="always thinks"):
        chat.thinking = False
    assert chat.thinking is True
    with pytest.raises(TemplateError):
        make_chat(variant="qwen3-4b-thinking-2507", thinking=False)


def test_answer_spelling_close_think_stays_whole_in_history() -> None:
    spelled = [522, 26865, 29]  # "</think>" as ordinary tokens, not the special id
    tokenizer = load_fixture_tokenizer("qwen3-4b")
    reply = (
        tokenizer.encode("<think>\nok\n</think>\n\nUse ")
        + spelled
        + tokenizer.encode(" tags.<|im_end|>")
    )
    chat, _ = make_chat(lambda u: reply if u.startswith("tags") else thinking_script(u))
    _, result = run(chat, "tags?")
    assert result.answer == "Use </think> tags." and result.thinking == "ok"
    run(chat, "next")
    prompt_text = tokenizer.decode(render_prompt(tokenizer, chat.messages))
    assert "<|im_start|>assistant\nUse </think> tags.<|im_end|>" in prompt_text


def test_max_tokens_inside_thinking_is_unfinished_thinking() -> None:
    chat, _ = make_chat(sampling={**GREEDY, "max_tokens": 4})
    events, result = run(chat, "melon")
    assert result.finish_reason == "length" and not result.thinking_finished
    assert result.answer == "" and result.thinking == "The user"
    assert not any(isinstance(e, AnswerText) for e in events)
    assert chat.turns[-1].thinking_finished is False
    assert_consistent(chat)


def test_repetition_guard_ends_a_loop() -> None:
    loop = "<think>\nI will check again. " + "Then I check again. " * 12 + "\n</think>\n\nx"
    chat, _ = make_chat(
        lambda u: loop, repetition_guard=RepetitionGuard(max_block=16, repeats=3, min_tokens=8)
    )
    _, result = run(chat, "loop")
    assert result.finish_reason == "repetition"
    period = len(chat.tokenizer.encode("Then I check again."))
    assert result.generated_tokens < 8 + 4 * period  # caught within the third copy or so
    assert result.thinking.startswith("I will check again. Then I check again. Then I check again.")
    assert_consistent(chat)
    run_again, _ = make_chat(lambda u: loop, repetition_guard=None)
    assert run(run_again, "loop")[1].finish_reason == "stop"


def test_closing_the_stream_keeps_the_partial_reply_marked_interrupted() -> None:
    chat, model = make_chat()
    run(chat, "apple")
    reply = chat.send("banana split")
    seen = []
    for event in reply:
        seen.append(event)
        if isinstance(event, AnswerText):
            break
    reply.close()
    seen += list(reply)  # what the detokenizer held back
    result = reply.result
    assert result.finish_reason == "interrupted"
    assert result.answer == texts(seen, AnswerText) and result.answer.startswith("Answer")
    assert chat.turns[-1].interrupted and chat.turns[-1].answer == result.answer
    assert chat.messages[-1] == {"role": "assistant", "content": result.answer}
    assert_consistent(chat)
    # The session goes on: the fake checks the context it reads back from the cache.
    _, after = run(chat, "cherry")
    assert after.answer == "Answer to cherry."
    assert_consistent(chat)


def test_keyboard_interrupt_through_the_stream_then_retry() -> None:
    chat, model = make_chat()
    run(chat, "apple")
    model.interrupt_after = len(model.fed) + 6  # prefill, then a few decode steps
    reply = chat.send("banana")
    with pytest.raises(KeyboardInterrupt):
        for _ in reply:
            pass
    model.interrupt_after = None
    assert reply.result.finish_reason == "interrupted"
    assert chat.turns[-1].interrupted and len(chat.turns) == 2
    assert_consistent(chat)
    retried = chat.retry()
    events, result = list(retried), retried.result
    assert result.finish_reason == "stop" and result.answer == "Answer to banana."
    assert len(chat.turns) == 2 and not chat.turns[-1].interrupted
    assert texts(events, AnswerText) == "Answer to banana."
    assert_consistent(chat)


def test_interrupt_during_prefill_keeps_the_session_consistent() -> None:
    chat, model = make_chat()
    run(chat, "apple")
    model.interrupt_after = len(model.fed)  # the very next model call
    reply = chat.send("banana")
    with pytest.raises(KeyboardInterrupt):
        list(reply)
    model.interrupt_after = None
    assert reply.result.finish_reason == "interrupted" and reply.result.generated_tokens == 0
    assert chat.turns[-1] == Turn("banana", "", "", True, "interrupted")
    assert_consistent(chat)
    assert run(chat, "cherry")[1].answer == "Answer to cherry."


def test_abandoned_stream_is_closed_by_the_next_send() -> None:
    chat, _ = make_chat()
    events = iter(chat.send("apple"))
    next(events)
    next(events)
    run(chat, "pear")  # never closed by the caller: send() closes it first
    assert [t.user for t in chat.turns] == ["apple", "pear"]
    assert chat.turns[0].interrupted and not chat.turns[1].interrupted
    assert_consistent(chat)


def test_a_stream_never_started_changes_nothing() -> None:
    chat, _ = make_chat()
    run(chat, "apple")
    chat.send("pear")  # not iterated
    retried = chat.retry()  # not iterated either
    assert [t.user for t in chat.turns] == ["apple"] and chat.turns[0].answer == "Answer to apple."
    retried.close()
    assert retried.result.finish_reason == "interrupted" and retried.result.generated_tokens == 0
    assert [t.user for t in chat.turns] == ["apple"] and chat.turns[0].answer == "Answer to apple."
    assert_consistent(chat)


def test_undo_reset_and_system_changes_keep_cache_and_history_in_step() -> None:
    chat, model = make_chat(system="One.")
    for word in ("apple", "pear", "plum"):
        run(chat, word)
    chat.undo()
    assert [t.user for t in chat.turns] == ["apple", "pear"]
    _, result = run(chat, "fig")
    prompt = render_prompt(chat.tokenizer, chat.messages[:-1])
    assert model.contexts[-1][: len(prompt)] == prompt and result.prompt_tokens == len(prompt)
    assert result.prefilled_tokens < result.prompt_tokens
    chat.system = "Two."
    _, result = run(chat, "kiwi")
    assert (
        result.prefilled_tokens > result.prompt_tokens - 5
    )  # the system prompt changed at the start
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "Two."}] and chat.system == "Two."
    _, result = run(chat, "lime")
    assert result.prefilled_tokens < result.prompt_tokens  # the system prompt's tokens were reused
    assert_consistent(chat)
    chat.system = None
    assert chat.messages[0]["role"] == "user"
    chat.reset()
    with pytest.raises(HistoryError):
        chat.undo()
    with pytest.raises(HistoryError):
        chat.retry()


def test_retry_regenerates_the_last_reply() -> None:
    answer = ["first"]
    chat, _ = make_chat(lambda u: f"{EMPTY_BLOCK}{answer[0]}<|im_end|>")
    run(chat, "q")
    answer[0] = "second"
    assert chat.retry().text() == "second" and [t.answer for t in chat.turns] == ["second"]
    assert_consistent(chat)


def test_a_prompt_that_does_not_fit_raises_and_loses_nothing() -> None:
    chat, _ = make_chat(context_length=60)
    run(chat, "apple")
    before = (chat.messages, chat.cache.tokens)
    with pytest.raises(ContextOverflowError) as caught:
        chat.send("banana " * 40)
    message = str(caught.value)
    assert "the context holds 60" in message and "\n" not in message
    # The library gives the numbers; the ways out (/undo, --rope-scaling) are each front end's.
    assert "/reset" not in message and "--rope" not in message
    assert caught.value.context_limit == 60 and caught.value.prompt_tokens > 60
    assert not caught.value.yarn_enabled
    assert (chat.messages, chat.cache.tokens) == before
    chat.reset()
    assert run(chat, "kiwi")[1].answer == "Answer to kiwi."


def test_overflow_with_yarn_already_on_does_not_suggest_it() -> None:
    tokenizer = load_fixture_tokenizer("qwen3-4b")
    model = ScriptedModel(
        tokenizer, thinking_script, context_length=20, rope_scaling={"rope_type": "yarn"}
    )
    chat = Chat(model, tokenizer, GenerationConfig())
    with pytest.raises(ContextOverflowError) as caught:
        chat.send("a long question " * 10)
    assert caught.value.yarn_enabled


def test_a_message_far_too_long_is_refused_by_its_size_without_tokenizing() -> None:
    chat, _ = make_chat(context_length=60)

    def never(*args, **kwargs):
        raise AssertionError("a message that cannot fit must not be tokenized")

    chat.tokenizer = SimpleNamespace(render=never, encode=never, has_thinking_switch=True)
    with pytest.raises(ContextOverflowError, match="needs at least 91 tokens"):
        chat.send("x" * (60 * MAX_TOKEN_BYTES) + "y" * 4_000)
    assert chat.turns == []


def test_prepare_prompt_gives_the_prompt_the_mode_and_its_settings() -> None:
    tokenizer = load_fixture_tokenizer("qwen3-4b")
    messages = [{"role": "user", "content": "apple /no_think"}]
    ready = prepare_prompt(
        tokenizer,
        messages,
        defaults=GenerationConfig(),
        context_limit=4096,
        explicit={"top_k": 5},
    )
    assert ready.prompt == render_prompt(tokenizer, messages, thinking=True)
    # The soft switch turns the reply's mode off: the plain preset, the explicit value on top.
    assert not ready.thinks
    assert (ready.sampling.temperature, ready.sampling.top_k) == (0.7, 5)
    with pytest.raises(ContextOverflowError, match="needs 1[0-9] tokens but the context holds 10"):
        prepare_prompt(tokenizer, messages, defaults=GenerationConfig(), context_limit=10)
    with pytest.raises(SettingsError, match="top_k must be in"):
        prepare_prompt(
            tokenizer,
            messages,
            defaults=GenerationConfig(),
            context_limit=4096,
            explicit={"top_k": -3},
        )


def test_no_token_of_the_real_vocabulary_is_longer_than_the_size_bound() -> None:
    tokenizer = load_fixture_tokenizer("qwen3-4b")
    longest = max(
        len(tokenizer.decode([i]).encode("utf-8", "surrogatepass")) for i in range(151_643)
    )
    assert longest == MAX_TOKEN_BYTES


def test_max_tokens_is_capped_by_the_context_left() -> None:
    chat, _ = make_chat(context_length=16)
    _, result = run(chat, "apple")
    assert result.finish_reason == "length"
    assert result.prompt_tokens + result.generated_tokens == 16
    assert chat.context_limit == 16


def test_greedy_in_thinking_mode_warns() -> None:
    chat, _ = make_chat()
    with pytest.warns(GreedyThinkingWarning, match="greedy"):
        run(chat, "apple")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(chat, "kiwi /no_think")  # not thinking: no warning


def test_context_used_counts_the_history() -> None:
    chat, _ = make_chat()
    assert chat.context_used == 0
    run(chat, "apple")
    assert chat.context_used == len(
        chat.tokenizer.render(chat.messages, add_generation_prompt=False)
    )
    assert 0 < chat.context_used < chat.context_limit


@pytest.mark.parametrize("how", ["ctrl-c", "close"])
@pytest.mark.parametrize("stage", ["prefill", "thinking", "answer"])
def test_a_reply_stopped_at_any_stage_matches_history_and_cache(stage: str, how: str) -> None:
    chat, model = make_chat()
    run(chat, "apple")
    reply = chat.send("banana split")
    seen: list = []
    if how == "ctrl-c":
        steps = {"prefill": 0, "thinking": 4, "answer": 12}[stage]
        model.interrupt_after = len(model.fed) + steps
        with pytest.raises(KeyboardInterrupt):
            for event in reply:
                seen.append(event)
        model.interrupt_after = None
    else:
        wanted = {"prefill": None, "thinking": ThinkingText, "answer": AnswerText}[stage]
        if wanted is not None:
            for event in reply:
                seen.append(event)
                if isinstance(event, wanted):
                    break
        reply.close()
    seen += list(reply)  # what the detokenizer held back
    result = reply.result
    assert result is not None and result.finish_reason == "interrupted"
    turn = chat.turns[-1]
    if how == "close" and stage == "prefill":  # never started: nothing changed
        assert [t.user for t in chat.turns] == ["apple"] and result.generated_tokens == 0
    else:
        assert turn.user == "banana split" and turn.interrupted
        assert (turn.answer, turn.thinking) == (result.answer, result.thinking)
        assert turn.thinking_finished == result.thinking_finished == (stage != "thinking")
        assert chat.messages[-1] == {"role": "assistant", "content": result.answer}
    # What a view showed, held-back text included, is exactly what the result and history hold.
    assert texts(seen, AnswerText) == result.answer
    assert texts(seen, ThinkingText) == result.thinking
    if stage == "answer":
        assert result.answer and "Answer to banana".startswith(result.answer)
    assert_consistent(chat)
    # The conversation goes on from a cache that holds exactly what the history says.
    assert run(chat, "cherry")[1].answer == "Answer to cherry."
    assert_consistent(chat)


def test_a_long_prefill_reports_its_progress_chunk_by_chunk() -> None:
    chat, _ = make_chat(context_length=4096)
    seen: list[tuple[int, int]] = []
    chat.on_prefill = lambda done, total: seen.append((done, total))
    reply = chat.send("apple " + "word " * 1500)
    assert reply.text() == "Answer to apple."
    total = reply.result.prompt_tokens - 1  # the last prompt token runs with the first step
    # 0 first (a view times the rate from there), then after each 512-token chunk.
    assert [done for done, _ in seen] == [0, *range(512, total, 512), total]
    assert {t for _, t in seen} == {total}
