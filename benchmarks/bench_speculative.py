"""What speculative decoding costs and gains on the CPU path, in one run.

    python -m benchmarks.bench_speculative                 # everything (builds 4B/0.6B once)
    python -m benchmarks.bench_speculative --skip-shapes   # only the tiny-model measurements
    python -m benchmarks.bench_speculative --skip-tiny --cpu-time   # parts 1, 2, 4 on a loaded machine
    python -m benchmarks.bench_speculative --skip-tiny --isa avx2   # as an AVX2-only CPU runs it
    python -m benchmarks.bench_speculative --paired 15   # 4B verify of 2-5 positions and the draft, paired
    python -m benchmarks.bench_speculative --loop 64     # the loop end to end, oracle drafts

1. Verify cost (random 4-bit weights at the Qwen3-4B shape): one target pass over 1..8 positions
   after a 128-token context, against one decode step (1 position). The native mat-vec takes up
   to 8 rows, so k+1 positions read the weights once.
2. Draft cost at the Qwen3-0.6B shape: one decode step, and the cost per token of drafting k
   tokens as DraftModel.propose does (each step computing while the next is built); the
   projections take the latter.
3. Measured on the shipped tiny model (real weights, real acceptance): its 4-bit copy as draft,
   and n-gram prompt lookup on repeat tasks and a tool loop: acceptance, tokens per target step,
   and speed against plain decoding (greedy, outputs checked equal).
4. Projected 4B drafted by 0.6B at acceptance 0.5/0.7/0.9, from the measured costs of 1 and 2:
   random weights cannot give a real acceptance rate, so those rows are projections.
5. N-gram lookup replayed on agent turns whose scripted replies quote their context (an edit
   call, a rewritten function, a quoted search result; benchmarks/agent_replay.py): acceptance
   and tokens per target step are exact for a target that writes those replies; the speed is
   projected from part 1's verify costs.
6. (--loop only) The loop end to end at the 4B shape drafted by the 0.6B shape: the draft model
   runs as it would, but its tokens are replaced by the target's known greedy reply, each wrong
   with probability 1 - acceptance; time per token after the prompt against plain decoding of
   the same reply. Measured costs at an assumed acceptance: what the projection leaves out (the
   loop's own work, the draft catching up after a round) shows here.

Timings on shared machines are noisy: best of --repeats, interleaved. Never asserted anywhere.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx

from benchmarks.checkpoints import checkpoint

CONTEXT = 128
clock = time.perf_counter  # --cpu-time: time.process_time


def pass_seconds(model: Any, cache: list[Any], rows: int, repeats: int) -> float:
    """Best time of one forward over `rows` new positions after the cache (trimmed back after)."""
    from qwen3_mlx.cache import cache_length, trim_cache

    length = cache_length(cache)
    ids = mx.array([[1000 + i for i in range(rows)]], dtype=mx.uint32)
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        logits = model(ids, cache=cache)
        mx.eval(logits)
        best = min(best, clock() - start)
        trim_cache(cache, length)
    return best


def context_cache(model: Any) -> list[Any]:
    """A cache holding CONTEXT tokens, as a decode in a real conversation would see."""
    from qwen3_mlx.cache import make_cache
    from qwen3_mlx.generate import prefill

    cache = make_cache(model)
    # Chunks of 8 rows take the native kernel: without OpenBLAS a long chunk would unpack the
    # weights once per row.
    prefill(model, list(range(100, 101 + CONTEXT)), cache, chunk=8)
    return cache


def verify_costs(shape: str, repeats: int, max_rows: int = 8) -> dict[int, float]:
    """Seconds of one pass over 1..max_rows positions at a shape (random 4-bit weights)."""
    from qwen3_mlx.loading import load

    model, _, _ = load(checkpoint(shape, 4))
    cache = context_cache(model)
    pass_seconds(model, cache, 1, 2)  # warm up
    costs = {rows: float("inf") for rows in range(1, max_rows + 1)}
    for _ in range(repeats):  # interleaved, so a busy moment hurts every row count alike
        for rows in costs:
            costs[rows] = min(costs[rows], pass_seconds(model, cache, rows, 1))
    del model, cache
    mx.clear_cache()
    return costs


def paired_verify_costs(rounds: int, positions: tuple[int, ...] = (2, 3, 4, 5)) -> None:
    """--paired: at the 4B shape, each pass over N positions, one 0.6B decode step, and 0.6B
    drafting of 2 tokens (per token, as DraftModel.propose drafts), each between two one-position
    4B passes, `rounds` times; the median and quartiles of cost / mean(the two steps around it),
    and the projection from those medians (drafting's). A busy moment of a shared host then
    touches both sides of a ratio, where the best-of-repeats of verify_costs can pair a quiet N
    with a busy step."""
    import statistics

    from qwen3_mlx.loading import load

    model, _, _ = load(checkpoint("4b", 4))
    draft_model, _, _ = load(checkpoint("0.6b", 4))
    cache, draft_cache = context_cache(model), context_cache(draft_model)
    drafter, context = drafter_at(draft_model)
    for rows in (1, *positions):
        pass_seconds(model, cache, rows, 2)  # warm up
    pass_seconds(draft_model, draft_cache, 1, 2)
    propose_seconds(drafter, context, 2)
    parts = (*positions, "step", "draft")
    ratios: dict[int | str, list[float]] = {part: [] for part in parts}
    steps = []
    for _ in range(rounds):
        for part in parts:
            before = pass_seconds(model, cache, 1, 1)
            if part == "step":
                seconds = pass_seconds(draft_model, draft_cache, 1, 1)
            elif part == "draft":
                seconds = propose_seconds(drafter, context, 2)
            else:
                seconds = pass_seconds(model, cache, part, 1)
            after = pass_seconds(model, cache, 1, 1)
            ratios[part].append(seconds / ((before + after) / 2))
            steps += [before, after]
    print(
        f"4B shape, paired passes ({rounds} rounds): one step median "
        f"{1000 * statistics.median(steps):.1f} ms",
        flush=True,
    )
    names = {"step": "one 0.6B step", "draft": "0.6B drafting 2 tokens, per token"}
    for part, values in ratios.items():
        low, _, high = statistics.quantiles(values, n=4)
        print(
            f"  {names.get(part, f'N={part}')}: median {statistics.median(values):.2f}x one 4B "
            f"step (quartiles {low:.2f}-{high:.2f})",
            flush=True,
        )
    verify = {1: 1.0, **{rows: statistics.median(ratios[rows]) for rows in positions}}
    draft = statistics.median(ratios["draft"])
    print("Projected 4B drafted by 0.6B, from these medians (assumed acceptance):", flush=True)
    for acceptance in (0.5, 0.7, 0.9):
        row = ", ".join(
            f"k={k} {projected_speedup(acceptance, k, verify, draft):.2f}x"
            for k in range(1, max(positions))
        )
        print(f"  acceptance {acceptance}: {row}", flush=True)


def drafter_at(model: Any) -> tuple[Any, list[int]]:
    """A DraftModel over `model` whose cache holds a CONTEXT-token context, and that context."""
    from qwen3_mlx.drafting import DraftModel

    drafter = DraftModel(model)
    drafter.cache.cache = context_cache(model)
    context = list(range(100, 101 + CONTEXT))
    drafter.cache.tokens = context[:-1]
    return drafter, context


def propose_seconds(drafter: Any, context: list[int], k: int) -> float:
    """Seconds per token of one DraftModel.propose of k tokens after context."""
    start = clock()
    drafter.propose(context, k)
    return (clock() - start) / k


def draft_costs(repeats: int, counts: range = range(1, 8)) -> tuple[float, dict[int, float]]:
    """Part 2: the 0.6B decode step, and the seconds per token of drafting k tokens (best of
    repeats, interleaved)."""
    from qwen3_mlx.loading import load

    model, _, _ = load(checkpoint("0.6b", 4))
    cache = context_cache(model)
    drafter, context = drafter_at(model)
    pass_seconds(model, cache, 1, 2)  # warm up
    propose_seconds(drafter, context, 2)
    step, per_token = float("inf"), {k: float("inf") for k in counts}
    for _ in range(repeats):
        step = min(step, pass_seconds(model, cache, 1, 1))
        for k in counts:
            per_token[k] = min(per_token[k], propose_seconds(drafter, context, k))
    del model, cache, drafter
    mx.clear_cache()
    return step, per_token


def projected_speedup(
    acceptance: float, k: int, verify: dict[int, float], draft: float | dict[int, float]
) -> float:
    """Expected speed-up of draft-k speculation over plain decoding (Leviathan et al.'s formula):
    tokens per round (1 - a^(k+1)) / (1 - a), at the cost of k draft steps and one verify pass;
    draft: seconds per drafted token, or those per k."""
    per_token = draft[k] if isinstance(draft, dict) else draft
    tokens = (1 - acceptance ** (k + 1)) / (1 - acceptance)
    return tokens * verify[1] / (k * per_token + verify[k + 1])


def print_shapes(repeats: int) -> dict[int, float]:
    """Parts 1, 2 and 4: verify and draft costs, and the projection; the verify costs."""
    target = verify_costs("4b", repeats)
    step = target[1]
    print("4B shape, 4-bit, random weights: one target pass over N positions", flush=True)
    for rows, seconds in target.items():
        print(
            f"  N={rows}: {1000 * seconds:7.1f} ms   {seconds / step:4.2f}x one decode step",
            flush=True,
        )
    one_step, draft = draft_costs(repeats)
    print(
        f"0.6B shape, 4-bit: one decode step {1000 * one_step:.1f} ms ({one_step / step:.2f}x 4B)",
        flush=True,
    )
    row = ", ".join(f"k={k} {draft[k] / step:.3f}x" for k in (1, 2, 3, 5))
    print(f"  drafting k tokens (DraftModel.propose), per token: {row}", flush=True)
    print("Projected 4B drafted by 0.6B (measured costs above, assumed acceptance):", flush=True)
    for acceptance in (0.5, 0.7, 0.9):
        best = max(range(1, 8), key=lambda k: projected_speedup(acceptance, k, target, draft))
        row = ", ".join(
            f"k={k} {projected_speedup(acceptance, k, target, draft):.2f}x" for k in (2, 3, 4, 5)
        )
        print(f"  acceptance {acceptance}: {row}; best k={best}", flush=True)
    # The ceiling the draft's cost alone leaves: every verify pass as cheap as one decode step.
    free = {rows: step for rows in range(1, 10)}
    ceiling = max(projected_speedup(0.7, k, free, draft) for k in range(1, 8))
    print(
        f"  ceiling at acceptance 0.7 if verifying cost one step at any N: {ceiling:.2f}x "
        f"(a drafted token costs {draft[2] / step:.3f} of a target step at k=2)",
        flush=True,
    )
    single = projected_speedup(0.7, 2, target, one_step)
    print(
        f"  at acceptance 0.7, k=2, from the one-step draft cost instead: {single:.2f}x", flush=True
    )
    print("Projected 4B with n-gram lookup (drafts cost nothing; assumed acceptance):", flush=True)
    for acceptance in (0.5, 0.7, 0.9):
        row = ", ".join(
            f"k={k} {projected_speedup(acceptance, k, target, 0.0):.2f}x" for k in (1, 2, 3, 5)
        )
        print(f"  acceptance {acceptance}: {row}", flush=True)
    return target


class OracleDraft:
    """A real 0.6B DraftModel's cost with an oracle's tokens: each propose() runs the draft model
    (its result dropped), then proposes the target's known greedy reply, each token wrong (so the
    target stops there) with probability 1 - acceptance, as the projection's model assumes."""

    def __init__(self, drafter: Any, reply: list[int], start: int, acceptance: float, seed: int):
        self.drafter, self.reply, self.start = drafter, reply, start
        self.acceptance, self.random = acceptance, random.Random(seed)

    def begin(self, context: list[int]) -> None:
        """Nothing to do: the draft model follows each context itself."""

    def propose(self, context: list[int], count: int) -> list[int]:
        """count tokens: the draft model's work, the oracle's tokens."""
        self.drafter.propose(context, count)
        done = len(context) - self.start
        known = self.reply[done : done + count]
        return [t if self.random.random() < self.acceptance else t ^ 1 for t in known]


def measured_loop(tokens: int, draft_tokens: int = 2, repeats: int = 3) -> None:
    """--loop: the speculative loop end to end at the 4B shape drafted by the 0.6B shape, at
    assumed acceptance (OracleDraft), against plain greedy decoding of the same reply; each
    output checked equal to plain decoding's."""
    from qwen3_mlx.cache import make_cache
    from qwen3_mlx.generate import generate_tokens
    from qwen3_mlx.loading import load
    from qwen3_mlx.speculative import speculative_tokens

    model, _, _ = load(checkpoint("4b", 4))
    drafter, _ = drafter_at(load(checkpoint("0.6b", 4))[0])
    prompt = list(range(100, 101 + CONTEXT))

    def timed(run: Any) -> tuple[list[Any], float]:
        """The GeneratedTokens of run(cache, on_prefill) and the seconds per token after the
        prefill."""
        cache, start = make_cache(model), []

        def prefilled(done: int, total: int) -> None:
            if done == total:  # the prompt's prefill is the same either way: not timed
                start.append(clock())

        out = list(run(cache, prefilled))
        return out, (clock() - start[-1]) / len(out)

    def plain(cache: Any, prefilled: Any) -> Any:
        return generate_tokens(model, prompt, cache, max_tokens=tokens, on_prefill=prefilled)

    reply = [token.token for token in timed(plain)[0]]
    print(
        f"4B drafted by 0.6B, measured end to end ({tokens} tokens after a {len(prompt)}-token "
        f"prompt, k={draft_tokens}, the draft model's tokens replaced by an oracle's):",
        flush=True,
    )
    for acceptance in (0.5, 0.7, 0.9):
        step = speculative = float("inf")
        for _ in range(repeats):  # alternating; the same oracle draws each time
            step = min(step, timed(plain)[1])
            oracle = OracleDraft(drafter, reply, len(prompt), acceptance, seed=1)
            out, seconds = timed(
                lambda cache, prefilled, oracle=oracle: speculative_tokens(
                    model,
                    prompt,
                    cache,
                    drafter=oracle,
                    draft_tokens=draft_tokens,
                    max_tokens=tokens,
                    on_prefill=prefilled,
                )
            )
            assert [token.token for token in out] == reply, "speculation changed the output"
            speculative = min(speculative, seconds)
        drafted, accepted = sum(t.drafted for t in out), sum(t.accepted for t in out)
        print(
            f"  acceptance {acceptance} (kept {accepted}/{drafted}, "
            f"{len(out) / sum(t.target_step for t in out):.2f} tokens a step): "
            f"{1000 * step:.1f} ms a token plain, {1000 * speculative:.1f} ms speculative "
            f"(best of {repeats}): {step / speculative:.2f}x",
            flush=True,
        )


TINY = Path(__file__).resolve().parents[1] / "models"
TOOL_QUESTIONS = ("What is the secret word for moon?", "Look up the secret word for river.")


def tiny_tasks(count: int, task: str = "copy") -> list[str]:
    """Word tasks (copy, reverse, sort) of the tiny model's training slice (tiny_model/tiny_data.py)."""
    sys.path.insert(0, str(TINY.parent / "tiny_model"))
    import tiny_data

    rng = random.Random(0)
    return [tiny_data.sample_problem(rng, task=task).question for _ in range(count)]


def run_turns(chat: Any, turns: list[Any]) -> tuple[list[int], list[Any], float]:
    """Every reply's tokens, their results, and the decode seconds (prefill excluded)."""
    tokens, results, seconds = [], [], 0.0
    for turn in turns:
        reply = turn(chat)
        reply.text()
        tokens += list(reply.tokens)
        results.append(reply.result)
        seconds += reply.result.generated_tokens / max(reply.result.decode_tokens_per_second, 1e-9)
    return tokens, results, seconds


def tool_loop_turns() -> list[Any]:
    """A secret-word question, its lookup call, the answer after the result; twice."""
    from qwen3_mlx.tools import ToolResult

    def ask(question: str) -> Any:
        return lambda chat: chat.send(question)

    def answer(word: str) -> Any:
        def send(chat: Any) -> Any:
            call = chat.turns[-1].tool_calls[0]
            return chat.send_tool_results([ToolResult(content=word, tool_call_id=call.id)])

        return send

    return [ask(TOOL_QUESTIONS[0]), answer("lake"), ask(TOOL_QUESTIONS[1]), answer("apple")]


def share(accepted: int, drafted: int) -> str:
    """The accepted share as '( 93 %)', or '(no drafts)'."""
    return f"({100 * accepted / drafted:3.0f} %)" if drafted else "(no drafts)"


def print_tiny(repeats: int) -> None:
    """Part 3: the tiny pair and n-gram lookup, measured (greedy; outputs checked equal)."""
    sys.path.insert(0, str(TINY.parent / "tiny_model"))
    import tiny_data

    from qwen3_mlx.chat import Chat
    from qwen3_mlx.drafting import NgramLookup, load_draft
    from qwen3_mlx.loading import load
    from qwen3_mlx.speculative import Speculation
    from qwen3_mlx.tokenizer import IM_END_ID, IM_START_ID

    model, tokenizer, config = load(TINY / "qwen3-tiny-chat")
    draft = load_draft(TINY / "qwen3-tiny-chat-4bit", model, tokenizer)
    repeat = [lambda chat, q=q: chat.send(q) for q in tiny_tasks(4)]
    # The same repeat task asked again: the reply repeats text already in the context.
    again = [lambda chat, q=q: chat.send(q) for q in tiny_tasks(2) for _ in range(2)]
    reverse = [lambda chat, q=q: chat.send(q) for q in tiny_tasks(4, "reverse")]
    tasks = {
        "repeat tasks": (repeat, []),
        "reverse tasks": (reverse, []),
        "asked twice": (again, []),
        "tool loop": (tool_loop_turns(), [tiny_data.TOOLS["lookup"]]),
    }
    drafters = {
        "4-bit copy k=4": lambda: Speculation(draft, 4),
        "ngram k=3": lambda: Speculation(NgramLookup(ends={IM_END_ID}, boundary=IM_START_ID), 3),
    }
    print(
        "Tiny model (measured, greedy, float32 on the CPU; speed-up = plain decode s / speculative):",
        flush=True,
    )
    for task, (turns, tools) in tasks.items():
        best_plain = float("inf")
        plain_tokens: list[int] = []
        rows = {}
        for _ in range(repeats):
            chat = Chat(
                model, tokenizer, config, sampling={"temperature": 0, "max_tokens": 96}, tools=tools
            )
            plain_tokens, _, seconds = run_turns(chat, turns)
            best_plain = min(best_plain, seconds)
            for name, make in drafters.items():
                chat = Chat(
                    model,
                    tokenizer,
                    config,
                    sampling={"temperature": 0, "max_tokens": 96},
                    tools=tools,
                    speculation=make(),
                )
                tokens, results, seconds = run_turns(chat, turns)
                assert tokens == plain_tokens, f"{name} changed the output of {task}"
                drafted = sum(r.drafted_tokens for r in results)
                accepted = sum(r.accepted_tokens for r in results)
                steps = sum(r.target_steps for r in results)
                best = min(rows.get(name, (0, 0, 0, float("inf")))[3], seconds)
                rows[name] = (accepted, drafted, len(tokens) / steps, best)
        for name, (accepted, drafted, per_step, seconds) in rows.items():
            print(
                f"  {task:<13} {name:<15} accepted {accepted:4d}/{drafted:<4d} {share(accepted, drafted)}  "
                f"{per_step:4.2f} tokens/step  {best_plain / seconds:4.2f}x plain speed  (exact)",
                flush=True,
            )


def main() -> None:
    """Run the parts asked for and print them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-shapes", action="store_true", help="only the tiny-model part")
    parser.add_argument("--skip-tiny", action="store_true", help="only the 4B/0.6B part")
    parser.add_argument(
        "--float32", action="store_true", help="the native mat-vec with float32 x, not int8"
    )
    parser.add_argument(
        "--isa",
        choices=["avx512", "avx2", "scalar"],
        help="force the native kernels' instruction set (an AVX2-only CPU: --isa avx2)",
    )
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="kernels on one thread, timed in CPU time (a loaded machine deschedules wall time)",
    )
    parser.add_argument(
        "--paired",
        type=int,
        metavar="ROUNDS",
        help="only the 4B verify cost of 2 to 5 positions and the 0.6B step, each between two "
        "4B steps, and the projection from their medians",
    )
    parser.add_argument(
        "--loop",
        type=int,
        metavar="TOKENS",
        help="only the speculative loop measured end to end at the 4B shape drafted by the 0.6B "
        "shape, at assumed acceptance (an oracle's tokens at the draft model's cost)",
    )
    args = parser.parse_args()
    if args.cpu_time:
        global clock
        from qwen3_mlx.cpu import quantized

        quantized.THREADS, clock = 1, time.process_time
        print("one thread, CPU time", flush=True)
    if args.isa:
        os.environ["QWEN3_MLX_NATIVE_ISA"] = args.isa  # read per call by the extension
        print(f"native kernels: {args.isa} (QWEN3_MLX_NATIVE_ISA)", flush=True)
    if args.float32:
        os.environ["QWEN3_MLX_NATIVE_INT8"] = "0"  # read per call by qwen3_mlx.cpu.native
        print("native kernel: float32 x (QWEN3_MLX_NATIVE_INT8=0)", flush=True)
    if args.paired:
        paired_verify_costs(args.paired)
        return
    if args.loop:
        measured_loop(args.loop, repeats=args.repeats)
        return
    verify = None if args.skip_shapes else print_shapes(args.repeats)
    if not args.skip_tiny:
        print_tiny(min(args.repeats, 3))
    print_agent_turns(verify)


def print_agent_turns(verify: dict[int, float] | None) -> None:
    """Part 5: n-gram lookup on agent turns that quote their context (replayed)."""
    from benchmarks.agent_replay import print_replays
    from qwen3_mlx.drafting import NgramLookup
    from qwen3_mlx.tokenizer import IM_END_ID, IM_START_ID, load_tokenizer

    tokenizer = load_tokenizer(TINY / "qwen3-tiny-chat")  # Qwen3's tokenizer
    drafters = {
        f"ngram k={k}": lambda: NgramLookup(ends={IM_END_ID}, boundary=IM_START_ID) for k in (3, 5)
    }
    print_replays(tokenizer, drafters, verify)


if __name__ == "__main__":
    main()
