"""Synthetic Qwen3 chat data for the tiny test model, shared by train_tiny.py and eval_tiny.py.

Every conversation is rendered with the real Qwen3-4B chat template, so the model learns the exact
token patterns of a Qwen3 hybrid-thinking chat model: `<think>\\n...\\n</think>\\n\\n` replies, the
empty think block after `/no_think`, the template's own empty block when `enable_thinking=False`,
multi-turn histories where earlier reasoning has been stripped, and tool use: OpenAI function
tools rendered by the template into the system turn, `<tool_call>` replies, and final answers read
from the `<tool_response>` the template builds from a `role: "tool"` message.

The tasks are ones a model with a 64-wide residual stream can master: repeat, reverse or sort two
to four words, and count the words in a list. (Sums were tried and dropped: at this width the model
reached 12 % on held-out sums after 1,500 steps while the word tasks were above 94 %.) A fixed slice
of the word sequences is held out (never used in training) for evaluation.

Two tools: `lookup(key)` returns a secret word the model can only copy from the tool response (a
random word of WORDS each time), and `word_count(text)`. With `word_count` among the tools every
count question calls it; without it the model counts itself. A question no given tool fits is
answered directly, and a secret-word question without `lookup` gets a fixed refusal. A fixed slice
of the lookup keys is held out like the word sequences.
"""

from __future__ import annotations

import json
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
TOOL_CALL_ID = 151657
END_TOOL_CALL_ID = 151658
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
# Lookup keys are single words, so a tenth would hold out only five; a fifth holds out ten.
HELD_OUT_KEY_MODULUS = 5

TOOLS = {
    "lookup": {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look up the secret word for a word",
            "parameters": {
                "type": "object",
                "properties": {"key": {"type": "string", "description": "The word to look up"}},
                "required": ["key"],
            },
        },
    },
    "word_count": {
        "type": "function",
        "function": {
            "name": "word_count",
            "description": "Count the words in a text",
            "parameters": {
                "type": "object",
                "properties": {"text": {"type": "string", "description": "The words to count"}},
                "required": ["text"],
            },
        },
    },
}
LOOKUP_FORMS = (
    "What is the secret word for {key}?",
    "Look up the secret word for {key}.",
    "Find the secret word for {key}",
    "Tell me the secret word for {key}.",
)
# With word_count given, these and the plain count questions all call it.
WORD_COUNT_FORMS = (
    "Use the tool to count the words: {words}",
    "Count these words with word_count: {words}",
)
TOOL_CALL_ID_TEXT = "call_1"
# Stage-3 shares: word tasks without tools, conversations with tools, secret words without tools.
TOOL_MIXTURE = (65, 30, 5)


@dataclass(frozen=True)
class Problem:
    """One task instance: the user question, a one-line reasoning and the exact answer."""

    task: str
    question: str
    reasoning: str
    answer: str  # for a tool call, the whole "<tool_call>\n...\n</tool_call>" text
    call: tuple[str, dict] | None = None  # (tool name, arguments) when the reply is a call


@dataclass(frozen=True)
class Example:
    """A rendered-ready conversation whose last assistant reply is the training target."""

    messages: tuple[dict, ...]
    enable_thinking: bool
    thinks: bool  # whether the final reply carries a non-empty think block
    problem: Problem
    tools: tuple[dict, ...] = ()

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


def _sample_words(rng: random.Random, task: str, held_out: bool) -> tuple[str, ...]:
    low, high = (2, 5) if task == "count" else (2, 4)
    while True:
        words = tuple(rng.choice(WORDS) for _ in range(rng.randint(low, high)))
        if task == "sort" and len(set(words)) < len(words):
            continue  # sorting with duplicates is legal but makes the reasoning line ambiguous
        if is_held_out(words) == held_out:
            return words


def sample_problem(rng: random.Random, held_out: bool = False, task: str | None = None) -> Problem:
    """Draw a problem from the training slice, or from the held-out slice when `held_out`."""
    task = task or rng.choice(TASKS)
    form = rng.choice(QUESTION_FORMS[task])
    return _word_problem(task, _sample_words(rng, task, held_out), form)


def is_held_out_key(key: str) -> bool:
    """Whether a lookup key belongs to the evaluation-only slice."""
    return zlib.crc32(("key:" + key).encode()) % HELD_OUT_KEY_MODULUS == 0


def call_text(name: str, arguments: dict) -> str:
    """The exact JSON of a call, as the template re-renders it from a dict or from this text."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def tool_loop(rng: random.Random, tool: str, held_out: bool) -> tuple[Problem, str, Problem]:
    """(the call, a tool result, the answer after it) for one question that `tool` fits.

    The lookup result is a random word every time: the model can only copy it from the response.
    """
    if tool == "lookup":
        key = rng.choice([word for word in WORDS if is_held_out_key(word) == held_out])
        question = rng.choice(LOOKUP_FORMS).format(key=key)
        arguments: dict = {"key": key}
        reasoning = f"The user wants the secret word for {key}, so I call lookup."
        result = rng.choice(WORDS)
        final = Problem(
            "lookup",
            question,
            f"The tool says the secret word for {key} is {result}.",
            f"The secret word for {key} is {result}.",
        )
    else:
        words = _sample_words(rng, "count", held_out)
        question = rng.choice(QUESTION_FORMS["count"] + WORD_COUNT_FORMS).format(
            words=" ".join(words)
        )
        arguments = {"text": " ".join(words)}
        reasoning = "The user wants the words counted, so I call word_count."
        result = str(len(words))
        final = Problem(
            "word_count",
            question,
            f"The tool counted {result} words.",
            f"There are {result} words.",
        )
    call = Problem(
        tool,
        question,
        reasoning,
        f"<tool_call>\n{call_text(tool, arguments)}\n</tool_call>",
        (tool, arguments),
    )
    return call, result, final


def refusal_problem(rng: random.Random, held_out: bool) -> Problem:
    """A secret-word question when no lookup tool is given: answered directly, no call."""
    key = rng.choice([word for word in WORDS if is_held_out_key(word) == held_out])
    return Problem(
        "refuse",
        rng.choice(LOOKUP_FORMS).format(key=key),
        f"The user wants the secret word for {key}, but no lookup tool is given.",
        f"I cannot look up the secret word for {key} without the lookup tool.",
    )


def _with_switch(rng: random.Random, text: str, switch: str | None) -> str:
    if switch is None:
        return text
    return f"{switch} {text}" if rng.random() < 0.2 else f"{text} {switch}"


def _final_turn(
    rng: random.Random, task: str | None, tools: tuple[str, ...], held_out: bool, after_result: bool
) -> tuple[Problem, list[Problem | tuple]]:
    """The final problem and what follows its question: nothing, or the call and its result."""
    fits = {"lookup": "lookup", "count": "word_count"}.get(task or "")
    if fits in tools:
        call, result, final = tool_loop(rng, fits, held_out)
        return (final, [call, result]) if after_result else (call, [])
    if task == "lookup":
        return refusal_problem(rng, held_out), []
    return sample_problem(rng, held_out=held_out, task=task), []


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
    tools: tuple[str, ...] = (),
    after_result: bool = False,
    call_reasoning: bool = True,
) -> Example:
    """Build one conversation; the latest /think or /no_think (system, then users) decides.

    `switches` gives the soft switch appended to each user turn (None for none). History turns
    always come from the training slice; only the final question follows `held_out`. `tools`
    names the tools given (TOOLS keys, in order); `task` "lookup" or "count" with a fitting tool
    makes the reply a call, or with `after_result` the answer after the call and its result.
    Without `call_reasoning` the call turn comes back as clients that drop `reasoning_content`
    send it (langchain-openai, openai-agents, `llm`), and the template renders it without a think
    block even in thinking mode.
    """
    switches = switches if switches is not None else (None,) * turns
    latest = [s for s in (system_switch, *switches) if s is not None]
    thinks = enable_thinking and (not latest or latest[-1] == "/think")
    messages: list[dict] = []
    if system is not None or system_switch is not None:
        content = system or rng.choice(SYSTEM_PROMPTS)
        messages.append({"role": "system", "content": _with_switch(rng, content, system_switch)})
    # With tools, history turns avoid the count task (word_count would turn it into a tool loop).
    history = [
        sample_problem(rng, task=rng.choice(TASKS[:3]) if tools else None) for _ in range(turns - 1)
    ]
    for index, problem in enumerate(history):
        messages.append(
            {"role": "user", "content": _with_switch(rng, problem.question, switches[index])}
        )
        # History keeps final answers only, as the template renders it after stripping thinking.
        messages.append({"role": "assistant", "content": problem.answer})
    final, loop = _final_turn(rng, task, tools, held_out, after_result)
    messages.append(
        {"role": "user", "content": _with_switch(rng, final.question, switches[turns - 1])}
    )
    if loop:
        call, result = loop
        name, arguments = call.call
        turn: dict = {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": TOOL_CALL_ID_TEXT,
                    "type": "function",
                    "function": {
                        "name": name,
                        "arguments": json.dumps(arguments, ensure_ascii=False),
                    },
                }
            ],
        }
        if call_reasoning:
            # Kept by the template inside the unfinished tool loop; empty renders no block.
            turn["reasoning_content"] = call.reasoning if thinks else ""
        messages.append(turn)
        messages.append({"role": "tool", "tool_call_id": TOOL_CALL_ID_TEXT, "content": result})
    given = tuple(TOOLS[name] for name in tools)
    return Example(tuple(messages), enable_thinking, thinks, final, given)


def _modes(rng: random.Random, turns: int) -> dict:
    """Random switches per user turn, an optional system prompt with its switch, enable_thinking."""
    switches = tuple(
        rng.choices((None, "/think", "/no_think"), weights=(50, 20, 30))[0] for _ in range(turns)
    )
    system_switch = None
    system = None
    if rng.random() < 0.25:
        system = rng.choice(SYSTEM_PROMPTS)
        system_switch = rng.choices((None, "/think", "/no_think"), weights=(60, 15, 25))[0]
    return dict(
        turns=turns,
        switches=switches,
        system=system,
        system_switch=system_switch,
        enable_thinking=rng.random() >= 0.2,
    )


def sample_tool_example(rng: random.Random, dropped_reasoning: float = 0.0) -> Example:
    """One conversation with tools given: a call, an answer after a result, or no fitting tool.

    `dropped_reasoning` is the share of thinking-mode loops whose call turn comes back without
    reasoning_content; at 0 no random number is drawn for it (stage 1's data is unchanged).
    """
    tools = rng.choice((("lookup",), ("word_count",), ("lookup", "word_count")))
    if len(tools) == 2 and rng.random() < 0.5:
        tools = tools[::-1]
    task = rng.choices(("lookup", "count", "copy", "reverse", "sort"), (35, 35, 10, 10, 10))[0]
    modes = _modes(rng, rng.choices((1, 2), weights=(85, 15))[0])
    latest = [s for s in (modes["system_switch"], *modes["switches"]) if s is not None]
    thinks = modes["enable_thinking"] and (not latest or latest[-1] == "/think")
    # A thinking-mode loop trains its call and its answer in one sequence (training_sequence),
    # unless its call turn comes back without reasoning: then only the answer is trained.
    after_result = thinks or rng.random() < 0.5
    call_reasoning = not (thinks and dropped_reasoning and rng.random() < dropped_reasoning)
    return make_example(
        rng,
        task=task,
        tools=tools,
        after_result=after_result,
        call_reasoning=call_reasoning,
        **modes,
    )


def sample_training_example(
    rng: random.Random, stage: int = 3, dropped_reasoning: float = 0.0
) -> Example:
    """Draw one training conversation from the mixture of modes, switches and turn counts.

    Stage 1 is the curriculum's start: single-turn repeat/reverse only. The tiny model learns to
    copy prompt words there in ~200 steps, and never does while those are 40 % of a full mixture.
    Stage 2 is the word tasks without tools; stage 3 adds conversations with tools (their
    prompts are ~250 tokens longer, so they come last) and secret-word questions without any.
    """
    if stage == 1:
        switch = rng.choices((None, "/think", "/no_think"), weights=(50, 20, 30))[0]
        return make_example(
            rng, switches=(switch,), enable_thinking=rng.random() >= 0.2, task=rng.choice(TASKS[:2])
        )
    if stage == 3:
        kind = rng.choices(("words", "tools", "refuse"), weights=(TOOL_MIXTURE))[0]
        if kind == "tools":
            return sample_tool_example(rng, dropped_reasoning)
        if kind == "refuse":
            return make_example(rng, task="lookup", **_modes(rng, 1))
    return make_example(rng, **_modes(rng, rng.choices((1, 2, 3), weights=(55, 20, 25))[0]))
