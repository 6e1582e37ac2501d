"""End to end with the trained tiny Qwen3 chat model (models/qwen3-tiny-chat): thinking, the soft
and hard switches, history free of thinking, the repetition guard, context overflow, interrupt then
retry, and save then load then continue.

The model answers the word tasks of tiny_model/tiny_data.py (repeat, reverse, sort, count) with a
one-line reasoning (it never learned the sums); the questions here come from its training slice, so greedy replies are exact.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from qwen3_mlx.chat import Chat
from qwen3_mlx.errors import ContextOverflowError
from qwen3_mlx.events import AnswerText, ThinkingText
from qwen3_mlx.stream import RepetitionGuard

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "models" / "qwen3-tiny-chat"
sys.path.insert(0, str(REPO / "tiny_model"))
import tiny_data  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::qwen3_mlx.settings.GreedyThinkingWarning"),
]
GREEDY = {"temperature": 0, "max_tokens": 80}


def problem(task: str, seed: int) -> tiny_data.Problem:
    return tiny_data.sample_problem(random.Random(seed), held_out=False, task=task)


@pytest.fixture(scope="module")
def loaded() -> tuple:
    from qwen3_mlx.loading import load

    return load(TINY)


def new_chat(loaded: tuple, **kwargs) -> Chat:
    model, tokenizer, generation_config = loaded
    kwargs.setdefault("sampling", GREEDY)
    return Chat(model, tokenizer, generation_config, model_id="qwen3-tiny-chat", **kwargs)


def ask(chat: Chat, text: str):
    reply = chat.send(text)
    return list(reply), reply.result


def ask_again(chat: Chat):
    reply = chat.retry()
    return list(reply), reply.result


def test_thinking_reply(loaded: tuple) -> None:
    chat = new_chat(loaded)
    word_problem = problem("reverse", 1)
    events, result = ask(chat, word_problem.question)
    assert result.finish_reason == "stop" and result.thinking_finished
    assert result.thinking == word_problem.reasoning
    assert result.answer == word_problem.answer
    assert "".join(e.text for e in events if isinstance(e, ThinkingText)) == result.thinking
    assert "".join(e.text for e in events if isinstance(e, AnswerText)) == result.answer
    assert result.thinking_seconds > 0 and result.decode_tokens_per_second > 0


def test_soft_and_hard_switches_across_turns_with_history_free_of_thinking(loaded: tuple) -> None:
    chat = new_chat(loaded, system="You are a helpful assistant.")
    first, second, third, fourth = (
        problem(t, s) for t, s in (("reverse", 2), ("sort", 3), ("copy", 4), ("count", 5))
    )
    _, result = ask(chat, first.question)
    assert (result.thinking, result.answer) == (first.reasoning, first.answer)
    _, result = ask(chat, f"{second.question} /no_think")
    assert (result.thinking, result.answer) == ("", second.answer)
    _, result = ask(chat, f"{third.question} /think")
    assert (result.thinking, result.answer) == (third.reasoning, third.answer)
    chat.thinking = False  # the hard switch
    _, result = ask(chat, fourth.question)
    assert (result.thinking, result.answer) == ("", fourth.answer)
    # Only the suffix was prefilled on every later turn.
    assert result.prefilled_tokens < result.prompt_tokens / 2
    assistant = [m["content"] for m in chat.messages if m["role"] == "assistant"]
    assert assistant == [first.answer, second.answer, third.answer, fourth.answer]
    assert [t.thinking for t in chat.turns] == [first.reasoning, "", third.reasoning, ""]


def test_repetition_guard_with_a_tiny_max_block(loaded: tuple) -> None:
    chat = new_chat(loaded, repetition_guard=RepetitionGuard(max_block=1, repeats=3, min_tokens=3))
    _, result = ask(chat, "Repeat these words: star star star star /no_think")
    assert result.finish_reason == "repetition"
    assert result.answer.startswith("star star star")
    plain = new_chat(loaded)
    assert (
        ask(plain, "Repeat these words: star star star star /no_think")[1].answer
        == "star star star star"
    )


def test_context_overflow_keeps_the_conversation(loaded: tuple) -> None:
    chat = new_chat(loaded, context_length=64)
    _, result = ask(chat, problem("copy", 6).question)
    with pytest.raises(ContextOverflowError, match="context holds 64"):
        chat.send("Count the words: " + " ".join(tiny_data.WORDS))
    assert len(chat.turns) == 1 and chat.turns[0].answer == result.answer


def test_interrupt_then_retry(loaded: tuple) -> None:
    chat = new_chat(loaded)
    sort_problem = problem("sort", 7)
    reply = chat.send(sort_problem.question)
    for event in reply:
        if isinstance(event, ThinkingText):
            break
    reply.close()
    assert reply.result.finish_reason == "interrupted" and chat.turns[-1].interrupted
    _, result = ask_again(chat)
    assert result.finish_reason == "stop" and result.answer == sort_problem.answer
    assert len(chat.turns) == 1 and not chat.turns[0].interrupted


def test_save_load_continue(loaded: tuple, tmp_path: Path) -> None:
    chat = new_chat(loaded)
    first, second = problem("count", 8), problem("sort", 9)
    ask(chat, first.question)
    chat.save(tmp_path / "tiny.json")
    model, tokenizer, generation_config = loaded
    again = Chat(model, tokenizer, generation_config, model_id="qwen3-tiny-chat")
    again.load(tmp_path / "tiny.json")
    assert again.messages == chat.messages and again.model_id == "qwen3-tiny-chat"
    _, result = ask(again, second.question)
    assert (result.thinking, result.answer) == (second.reasoning, second.answer)
    assert [m["content"] for m in again.messages if m["role"] == "assistant"] == [
        first.answer,
        second.answer,
    ]
