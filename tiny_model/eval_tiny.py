"""Evaluate the tiny Qwen3 chat model on held-out prompts and print a table.

    python tiny_model/eval_tiny.py                 # full evaluation, 100 prompts a set
    python tiny_model/eval_tiny.py --quick         # 20 prompts a set, no transformers
    python tiny_model/eval_tiny.py --model /tmp/run --n 50 --no-4bit

Every prompt's final question comes from the held-out slice of tiny_data (word sequences never
used in training). Generation runs through mlx-lm, transformers (torch) and the project's own
qwen3_mlx loader.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_data  # noqa: E402
import tiny_tokens  # noqa: E402
from tiny_data import END_THINK_ID, IM_END_ID, THINK_ID, Example  # noqa: E402
from tiny_tokens import answer_text  # noqa: E402

MODELS = tiny_data.REPO_ROOT / "models"
MAX_TOKENS = 256
STOP_IDS = (tiny_data.IM_END_ID, tiny_data.ENDOFTEXT_ID)
SAMPLING = {True: (0.6, 0.95, 20), False: (0.7, 0.8, 20)}  # thinking / non-thinking presets

# (name, builder): every set asks held-out questions, tasks in rotation.
SETS: dict[str, Callable[[random.Random, str], Example]] = {
    "thinking": lambda rng, task: tiny_data.make_example(rng, held_out=True, task=task),
    "/no_think": lambda rng, task: tiny_data.make_example(
        rng, held_out=True, task=task, switches=("/no_think",)
    ),
    "enable_thinking=False": lambda rng, task: tiny_data.make_example(
        rng, held_out=True, task=task, enable_thinking=False
    ),
}


def latest_switch_example(rng: random.Random, task: str) -> Example:
    """Three turns whose switches disagree, so only the latest one predicts the reply."""
    first, last = rng.sample(["/think", "/no_think"], 2)
    switches = rng.choice([(first, None, last), (first, last, None), (None, first, last)])
    system_switch = rng.choice([None, None, first])
    return tiny_data.make_example(
        rng, held_out=True, task=task, turns=3, switches=switches, system_switch=system_switch
    )


SETS["latest switch (3 turns)"] = latest_switch_example

# Tool sets: the i-th example of each rotates thinking, /no_think and enable_thinking=False.
MODES = (
    {},
    {"switches": ("/no_think",)},
    {"enable_thinking": False},
)
WITH_LOOKUP = (("lookup",), ("lookup", "word_count"), ("word_count", "lookup"))
WITH_WORD_COUNT = (("word_count",), ("lookup", "word_count"), ("word_count", "lookup"))


def _tool_set(task: str, tool_sets: tuple, after_result: bool, **options) -> Callable:
    def build(rng: random.Random, index: int) -> Example:
        return tiny_data.make_example(
            rng,
            held_out=True,
            task=task,
            tools=rng.choice(tool_sets),
            after_result=after_result,
            **MODES[index % len(MODES)],
            **options,
        )

    return build


def _no_fit(rng: random.Random, index: int) -> Example:
    """Tools given, none fits: a word task, a count with only lookup, a lookup with word_count."""
    task, tool_sets = rng.choice(
        [
            ("copy", WITH_LOOKUP + WITH_WORD_COUNT),
            ("reverse", WITH_LOOKUP + WITH_WORD_COUNT),
            ("sort", WITH_LOOKUP + WITH_WORD_COUNT),
            ("count", (("lookup",),)),
            ("lookup", (("word_count",),)),
        ]
    )
    return _tool_set(task, tool_sets, False)(rng, index)


def _no_tools(rng: random.Random, index: int) -> Example:
    """No tools given: a secret-word question (refused) or a count question."""
    task = "lookup" if index % 2 == 0 else "count"
    return tiny_data.make_example(rng, held_out=True, task=task, **MODES[index % len(MODES)])


def _without_reasoning(rng: random.Random, index: int) -> Example:
    """Thinking mode, the call turn sent back without reasoning_content: answer after the result."""
    task, tool_sets = (("lookup", WITH_LOOKUP), ("count", WITH_WORD_COUNT))[index % 2]
    return _tool_set(task, tool_sets, True, call_reasoning=False)(rng, 0)  # MODES[0]: thinking


TOOL_SETS: dict[str, Callable[[random.Random, int], Example]] = {
    "call lookup": _tool_set("lookup", WITH_LOOKUP, False),
    "call word_count": _tool_set("count", WITH_WORD_COUNT, False),
    "answer after lookup result": _tool_set("lookup", WITH_LOOKUP, True),
    "answer after word_count result": _tool_set("count", WITH_WORD_COUNT, True),
    "tools given, none fits": _no_fit,
    "no tools, secret word or count": _no_tools,
    # Last, so the earlier sets draw the same prompts as before it was added.
    "answer after a result, call sent without reasoning": _without_reasoning,
}
NO_TOOL_SETS = (*SETS, "no tools, secret word or count")


def build_sets(n: int, seed: int, tools: bool = True) -> dict[str, list[Example]]:
    """n held-out examples per set, deterministic in the seed."""
    rng = random.Random(seed)
    sets = {
        name: [builder(rng, tiny_data.TASKS[i % len(tiny_data.TASKS)]) for i in range(n)]
        for name, builder in SETS.items()
    }
    if tools:
        sets.update({name: [build(rng, i) for i in range(n)] for name, build in TOOL_SETS.items()})
    return sets


# ---------------------------------------------------------------- generation backends


def mlx_lm_generator(path: Path) -> Callable:
    """generate(prompt_ids, sampling) -> reply ids, through mlx_lm.load and generate_step."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    model, _ = load(str(path))

    def generate(prompt: list[int], sampling: tuple | None) -> list[int]:
        import mlx.core as mx

        sampler = make_sampler(*_sampler_args(sampling))
        reply = []
        for token, _ in generate_step(
            mx.array(prompt), model, max_tokens=MAX_TOKENS, sampler=sampler
        ):
            reply.append(int(token))
            if reply[-1] in STOP_IDS:
                break
        return reply

    return generate


def _sampler_args(sampling: tuple | None) -> tuple:
    if sampling is None:
        return (0.0,)
    temp, top_p, top_k = sampling
    return (temp, top_p, 0.0, 1, top_k)


def transformers_generator(path: Path) -> Callable:
    """Greedy generate(prompt_ids) -> reply ids with transformers' Qwen3ForCausalLM in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()

    def generate(prompt: list[int], sampling: tuple | None = None) -> list[int]:
        assert sampling is None, "transformers backend is greedy only"
        with torch.no_grad():
            output = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=MAX_TOKENS,
                do_sample=False,
                eos_token_id=list(STOP_IDS),
                pad_token_id=tiny_data.ENDOFTEXT_ID,
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            )
        return output[0, len(prompt) :].tolist()

    return generate


def qwen3_mlx_generator(path: Path, compute_dtype: str = "auto") -> Callable:
    """Greedy generate with the project's own loader: model(ids[None], cache=cache) -> logits.

    compute_dtype "auto" is float32 on the CPU backend; "checkpoint" computes in bf16 like mlx-lm.
    """
    import mlx.core as mx

    from qwen3_mlx.cache import make_cache
    from qwen3_mlx.loading import load

    model, _, _ = load(path, compute_dtype=compute_dtype)

    def generate(prompt: list[int], sampling: tuple | None = None) -> list[int]:
        assert sampling is None, "qwen3_mlx backend is greedy only here"
        cache = make_cache(model)
        inputs = mx.array(prompt)
        reply: list[int] = []
        while len(reply) < MAX_TOKENS:
            logits = model(inputs[None], cache=cache)
            reply.append(int(mx.argmax(logits[0, -1]).item()))
            if reply[-1] in STOP_IDS:
                break
            inputs = mx.array(reply[-1:])
        return reply

    return generate


# ---------------------------------------------------------------- scoring


@dataclass
class Scored:
    """Per-reply verdicts for one example."""

    exact: bool  # the exact answer, or for a call the right tool with exact arguments
    structure: bool
    stopped: bool
    length: int
    task: str
    called: bool  # any <tool_call> after the think block


@dataclass
class Tally:
    """Counts for one (backend, set) cell."""

    items: list[Scored] = field(default_factory=list)

    def rate(self, attribute: str) -> float:
        """Share of items whose `attribute` is true."""
        return sum(getattr(item, attribute) for item in self.items) / max(1, len(self.items))


def score(tokenizer, example: Example, reply: list[int]) -> Scored:
    """Check the answer text, the think block (by token id) and the stop of one reply."""
    think_ids, _ = tiny_tokens.split_reply(reply)
    answer = answer_text(tokenizer, reply)
    if not example.enable_thinking:
        structure = THINK_ID not in reply and END_THINK_ID not in reply
    elif example.thinks:
        structure = think_ids is not None and tokenizer.decode(think_ids).strip() != ""
    else:
        structure = think_ids is not None and tokenizer.decode(think_ids).strip() == ""
    if example.enable_thinking:
        structure = structure and reply[:1] == [THINK_ID] and reply.count(END_THINK_ID) == 1
    stopped = reply[-1:] == [IM_END_ID] and len(reply) <= MAX_TOKENS // 2
    calls = tiny_tokens.parse_tool_calls(reply, tokenizer)
    if example.problem.call is None:
        exact = answer == example.problem.answer and not calls
        task = example.problem.task
    else:
        name, arguments = example.problem.call
        exact = [parsed for _, parsed in calls] == [{"name": name, "arguments": arguments}]
        task = "call " + name
    return Scored(exact, structure, stopped, len(reply), task, bool(calls))


def run_sets(
    tokenizer, generate: Callable, sets: dict, prompts: dict, sampling: bool
) -> dict[str, Tally]:
    """Generate and score every example of every set with one backend."""
    tallies = {}
    for name, examples in sets.items():
        tally = Tally()
        for example, prompt in zip(examples, prompts[name], strict=True):
            preset = SAMPLING[example.thinks] if sampling else None
            tally.items.append(score(tokenizer, example, generate(prompt, preset)))
        tallies[name] = tally
    return tallies


def untrained_mass(path: Path, tokenizer, sets: dict, prompts: dict, limit: int = 10) -> float:
    """Largest probability any step of a greedy reply gives to tokens the data never uses."""
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(path))
    rng = random.Random(0)
    used = set()
    for _ in range(3000):
        used.update(
            sum(tiny_tokens.encode_example(tokenizer, tiny_data.sample_training_example(rng)), [])
        )
    mask = mx.array([i not in used for i in range(tiny_data.VOCAB_SIZE)])
    worst = 0.0
    for name, examples in sets.items():
        for example, prompt in zip(examples[:limit], prompts[name][:limit], strict=True):
            sequence = prompt + tiny_tokens.encode_example(tokenizer, example)[1]
            # Steps that predict reply tokens; the step after the final stop was never trained.
            steps = slice(len(prompt) - 1, len(sequence) - 1)
            logits = model(mx.array(sequence)[None])[0, steps].astype(mx.float32)
            probs = mx.softmax(logits, axis=-1)
            worst = max(worst, mx.max(mx.sum(mx.where(mask, probs, 0.0), axis=-1)).item())
    return worst


# ---------------------------------------------------------------- report


def row(label: str, value: float, target: float | None, as_percent: bool = True) -> str:
    """One table line with the value, the target and PASS/FAIL."""
    shown = f"{100 * value:6.1f} %" if as_percent else f"{value:8.2g}"
    if target is None:
        return f"| {label:<58} | {shown:>9} |          |      |"
    goal = f">= {100 * target:.0f} %" if as_percent else f"<= {target:g}"
    verdict = "PASS" if (value >= target if as_percent else value <= target) else "FAIL"
    return f"| {label:<58} | {shown:>9} | {goal:>8} | {verdict} |"


def report(results: dict, extras: list[str]) -> str:
    """The markdown table of every measured cell."""
    lines = ["| check | value | target | |", "| --- | ---: | ---: | --- |"]
    for (backend, mode), tallies in results.items():
        target = 0.95 if mode == "greedy" else 0.90
        if backend == "mlx-lm 4-bit":
            target = 0.90
        for name, tally in tallies.items():
            label = "right tool, exact arguments" if name.startswith("call") else "exact answer"
            lines.append(row(f"{backend} {mode}: {label}, {name}", tally.rate("exact"), target))
        everything = [item for tally in tallies.values() for item in tally.items]
        merged = Tally(everything)
        no_tools = Tally([item for name in NO_TOOL_SETS for item in tallies[name].items])
        lines.append(
            row(
                f"{backend} {mode}: no call when no tool is given",
                1 - no_tools.rate("called"),
                0.98 if backend != "mlx-lm 4-bit" else 0.90,
            )
        )
        lines.append(
            row(
                f"{backend} {mode}: no call when tools are given but none fits",
                1 - tallies["tools given, none fits"].rate("called"),
                None,
            )
        )
        lines.append(
            row(
                f"{backend} {mode}: think-block structure, all sets",
                merged.rate("structure"),
                0.99 if mode == "greedy" else 0.95,
            )
        )
        lines.append(
            row(
                f"{backend} {mode}: ends with <|im_end|> within 128 tokens",
                merged.rate("stopped"),
                1.0 if mode == "greedy" else 0.99,
            )
        )
    lines.extend(extras)
    return "\n".join(lines)


def per_task(results: dict) -> str:
    """Greedy exact rate per task for each backend (diagnostics)."""
    lines = []
    for (backend, mode), tallies in results.items():
        items = [item for tally in tallies.values() for item in tally.items]
        rates = []
        for task in dict.fromkeys(item.task for item in items):
            chosen = [item.exact for item in items if item.task == task]
            rates.append(f"{task} {100 * sum(chosen) / max(1, len(chosen)):.0f}%")
        longest = max(item.length for item in items)
        lines.append(f"{backend} {mode}: " + ", ".join(rates) + f"; longest reply {longest} tokens")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=MODELS / "qwen3-tiny-chat")
    parser.add_argument("--model-4bit", type=Path, default=MODELS / "qwen3-tiny-chat-4bit")
    parser.add_argument("--n", type=int, default=100, help="held-out prompts per set")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--quick", action="store_true", help="20 prompts a set, mlx-lm only")
    parser.add_argument("--no-4bit", action="store_true")
    parser.add_argument("--no-sampling", action="store_true")
    return parser.parse_args()


def main() -> None:
    """Run every backend over the held-out sets and print the table."""
    args = parse_args()
    from transformers import AutoTokenizer

    if args.quick:
        args.n = min(args.n, 20)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    sets = build_sets(args.n, args.seed)
    prompts = {
        name: [tiny_tokens.render_prompt(tokenizer, e) for e in examples]
        for name, examples in sets.items()
    }
    started = time.time()
    results: dict = {}
    replies: dict = {}
    mlx_generate = mlx_lm_generator(args.model)
    results[("mlx-lm bf16", "greedy")] = run_sets(
        tokenizer, _recording(mlx_generate, replies, "mlx-lm bf16"), sets, prompts, False
    )
    if not args.no_sampling:
        import mlx.core as mx

        mx.random.seed(args.seed)
        results[("mlx-lm bf16", "sampled")] = run_sets(tokenizer, mlx_generate, sets, prompts, True)
    if not args.no_4bit and args.model_4bit.exists():
        results[("mlx-lm 4-bit", "greedy")] = run_sets(
            tokenizer, mlx_lm_generator(args.model_4bit), sets, prompts, False
        )
    extras = []
    # (name, factory, the reference it must agree with at the same precision)
    backends = (
        []
        if args.quick
        else [
            ("transformers f32", transformers_generator, None),
            ("qwen3_mlx f32", qwen3_mlx_generator, "transformers f32"),
            ("qwen3_mlx bf16", lambda p: qwen3_mlx_generator(p, "checkpoint"), "mlx-lm bf16"),
        ]
    )
    for name, factory, reference in backends:
        generate = factory(args.model)
        results[(name, "greedy")] = run_sets(
            tokenizer, _recording(generate, replies, name), sets, prompts, False
        )
        if reference is not None:
            extras.append(agreement(tokenizer, replies, name, reference, 1.0))
    if not args.quick:
        # Diagnostic: float32 and bf16 arithmetic may break a near-tie differently.
        extras.append(agreement(tokenizer, replies, "transformers f32", "mlx-lm bf16", None))
    mass = untrained_mass(args.model, tokenizer, sets, prompts)
    # Diagnostic only: how much a reply step leaves for tokens the data never uses.
    extras.append(
        row("max probability on never-trained tokens (greedy steps)", mass, None, as_percent=False)
    )
    print(report(results, extras))
    print()
    print(per_task(results))
    print(f"\n{args.n} held-out prompts per set, {len(sets)} sets; {time.time() - started:.0f}s")


def agreement(tokenizer, replies: dict, name: str, reference: str, target: float | None) -> str:
    """Table row: share of prompts where two backends' greedy answers are equal (and token ids)."""
    pairs = list(zip(replies[reference], replies[name], strict=True))
    answers = sum(answer_text(tokenizer, a) == answer_text(tokenizer, b) for a, b in pairs)
    ids = sum(a == b for a, b in pairs)
    label = f"{name} greedy answer = {reference}'s ({ids}/{len(pairs)} same ids)"
    return row(label, answers / len(pairs), target)


def _recording(generate: Callable, replies: dict, key: str) -> Callable:
    replies[key] = []

    def wrapped(prompt: list[int], sampling: tuple | None) -> list[int]:
        reply = generate(prompt, sampling)
        replies[key].append(reply)
        return reply

    return wrapped


if __name__ == "__main__":
    main()
