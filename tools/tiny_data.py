"""Synthetic Qwen3 chat data for the tiny test model, shared by train_tiny.py and eval_tiny.py.

Every conversation is rendered with the real Qwen3-4B chat template, so the model learns the exact
token patterns of a Qwen3 hybrid-thinking chat model: `<think>\\n...\\n</think>\\n\\n` replies, the
empty think block after `/no_think`, the template's own empty block when `enable_thinking=False`,
and multi-turn histories where earlier reasoning has been stripped.

The tasks are ones a model with a 64-wide residual stream can master: repeat, reverse or sort two
to four words, and count the words in a list. (Sums were tried and dropped: at this width the model
reached 12 % on held-out sums after 1,500 steps while the word tasks were above 94 %.) A fixed slice
of the word sequences is held out (never used in training) for evaluation.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_QWEN3 = REPO_ROOT.parent / "shared" / "qwen3"  # ../shared beside the checkout, as in CI

THINK_ID = 151667
END_THINK_ID = 151668
IM_START_ID = 151644
IM_END_ID = 151645
ENDOFTEXT_ID = 151643
VOCAB_SIZE = 151936

# Each word is one token both at the start of a reply ("river") and after a space (" river").
WORDS = (
    "apple banana bear bell bird book bread cake castle cloud coffee door dragon duck egg fish "
    "forest frog glass horse house key lake lamp lion mirror monkey moon music orange paper "
    "planet queen rabbit rain river rocket salt ship silver snow star stone table tree turtle "
    "water window wolf yellow"
).split()

TASKS = ("copy", "reverse", "sort", "count")

# Every phrasing is used in training; the held-out part is the word sequences.
QUESTION_FORMS = {
    "copy": ("Repeat these words: {words}", "Say these words back: {words}", "Copy: {words}"),
    "reverse": (
        "Reverse these words: {words}",
        "Reverse the order: {words}",
        "Say these words backwards: {words}",
    ),
    "sort": (
        "Sort these words alphabetically: {words}",
        "Put these words in alphabetical order: {words}",
        "Sort: {words}",
    ),
    "count": (
        "How many words are in this list: {words}?",
        "Count the words: {words}",
    ),
}

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "You are a tiny test model. Answer briefly.",
)

# Fraction of word sequences kept out of training, chosen by a stable hash.
HELD_OUT_MODULUS = 10


@dataclass(frozen=True)
class Problem:
    """One task instance: the user question, a one-line reasoning and the exact answer."""

    task: str
    question: str
    reasoning: str
    answer: str


@dataclass(frozen=True)
class Example:
    """A rendered-ready conversation whose last assistant reply is the training target."""

    messages: tuple[dict, ...]
    enable_thinking: bool
    thinks: bool  # whether the final reply carries a non-empty think block
    problem: Problem

    def completion(self) -> str:
        """The text the model must produce after the generation prompt, stop token included."""
        if not self.enable_thinking:
            return self.problem.answer + "<|im_end|>"
        reasoning = self.problem.reasoning if self.thinks else ""
        return f"<think>\n{reasoning}\n</think>\n\n{self.problem.answer}<|im_end|>"


def is_held_out(words: tuple[str, ...]) -> bool:
    """Whether a word sequence belongs to the evaluation-only slice (for every task alike)."""
    return zlib.crc32(("words:" + " ".join(words)).encode()) % HELD_OUT_MODULUS == 0


def _word_problem(task: str, words: tuple[str, ...], form: str) -> Problem:
    question = form.format(words=" ".join(words))
    n = len(words)
    if task == "copy":
        answer = list(words)
        reasoning = f"The user wants the {n} words repeated in the same order."
    elif task == "reverse":
        answer = list(reversed(words))
        reasoning = f"The user wants the {n} words in reverse order, starting with {answer[0]}."
    elif task == "sort":
        answer = sorted(words)
        reasoning = f"The user wants the {n} words sorted from A to Z, starting with {answer[0]}."
    else:
        counted = ", ".join(f"{word} {index}" for index, word in enumerate(words, 1))
        return Problem(task, question, f"Counting them: {counted}.", str(n))
    return Problem(task, question, reasoning, " ".join(answer))


def sample_problem(rng: random.Random, held_out: bool = False, task: str | None = None) -> Problem:
    """Draw a problem from the training slice, or from the held-out slice when `held_out`."""
    task = task or rng.choice(TASKS)
    form = rng.choice(QUESTION_FORMS[task])
    low, high = (2, 5) if task == "count" else (2, 4)
    while True:
        words = tuple(rng.choice(WORDS) for _ in range(rng.randint(low, high)))
        if task == "sort" and len(set(words)) < len(words):
            continue  # sorting with duplicates is legal but makes the reasoning line ambiguous
        if is_held_out(words) == held_out:
            return _word_problem(task, words, form)


def _with_switch(rng: random.Random, text: str, switch: str | None) -> str:
    if switch is None:
        return text
    return f"{switch} {text}" if rng.random() < 0.2 else f"{text} {switch}"


def make_example(
    rng: random.Random,
    *,
    held_out: bool = False,
    turns: int = 1,
    switches: tuple[str | None, ...] | None = None,
    system: str | None = None,
    system_switch: str | None = None,
    enable_thinking: bool = True,
    task: str | None = None,
) -> Example:
    """Build one conversation; the latest /think or /no_think (system, then users) decides.

    `switches` gives the soft switch appended to each user turn (None for none). History turns
    always come from the training slice; only the final question follows `held_out`.
    """
    switches = switches if switches is not None else (None,) * turns
    messages: list[dict] = []
    if system is not None or system_switch is not None:
        content = system or rng.choice(SYSTEM_PROMPTS)
        messages.append({"role": "system", "content": _with_switch(rng, content, system_switch)})
    history = [sample_problem(rng) for _ in range(turns - 1)]
    final = sample_problem(rng, held_out=held_out, task=task)
    for index, problem in enumerate([*history, final]):
        messages.append(
            {"role": "user", "content": _with_switch(rng, problem.question, switches[index])}
        )
        if problem is not final:
            # History keeps final answers only, as the template renders it after stripping thinking.
            messages.append({"role": "assistant", "content": problem.answer})
    latest = [s for s in (system_switch, *switches) if s is not None]
    thinks = enable_thinking and (not latest or latest[-1] == "/think")
    return Example(tuple(messages), enable_thinking, thinks, final)


def sample_training_example(rng: random.Random, stage: int = 2) -> Example:
    """Draw one training conversation from the mixture of modes, switches and turn counts.

    Stage 1 is the curriculum's start: single-turn repeat/reverse only. The tiny model learns to
    copy prompt words there in ~200 steps, and never does while those are 40 % of a full mixture.
    """
    if stage == 1:
        switch = rng.choices((None, "/think", "/no_think"), weights=(50, 20, 30))[0]
        return make_example(
            rng, switches=(switch,), enable_thinking=rng.random() >= 0.2, task=rng.choice(TASKS[:2])
        )
    turns = rng.choices((1, 2, 3), weights=(55, 20, 25))[0]
    switches = tuple(
        rng.choices((None, "/think", "/no_think"), weights=(50, 20, 30))[0] for _ in range(turns)
    )
    system_switch = None
    system = None
    if rng.random() < 0.25:
        system = rng.choice(SYSTEM_PROMPTS)
        system_switch = rng.choices((None, "/think", "/no_think"), weights=(60, 15, 25))[0]
    enable_thinking = rng.random() >= 0.2
    return make_example(
        rng,
        turns=turns,
        switches=switches,
        system=system,
        system_switch=system_switch,
        enable_thinking=enable_thinking,
    )


def render_prompt(tokenizer, example: Example) -> list[int]:
    """Token ids of the conversation up to and including the generation prompt."""
    text = tokenizer.apply_chat_template(
        list(example.messages),
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=example.enable_thinking,
    )
    return tokenizer.encode(text, add_special_tokens=False)


def encode_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) for one example; the completion ends with <|im_end|>."""
    completion = tokenizer.encode(example.completion(), add_special_tokens=False)
    return render_prompt(tokenizer, example), completion


def split_reply(token_ids: list[int]) -> tuple[list[int] | None, list[int]]:
    """Split generated ids into (think-block ids or None when absent, answer ids before the stop)."""
    ids = list(token_ids)
    if IM_END_ID in ids:
        ids = ids[: ids.index(IM_END_ID)]
    if ids[:1] == [THINK_ID] and END_THINK_ID in ids:
        end = ids.index(END_THINK_ID)
        return ids[1:end], ids[end + 1 :]
    return None, ids


def answer_text(tokenizer, reply: list[int]) -> str:
    """The answer of a reply: the text after the think block, before the stop."""
    return tokenizer.decode(split_reply(reply)[1]).strip()
