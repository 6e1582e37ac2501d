"""What schema-constrained tool arguments cost per decoded token, beside mlx-lm's plain decode.

    python -m benchmarks.bench_tool_constraint                 # Qwen3-0.6B shape, 4-bit
    python -m benchmarks.bench_tool_constraint --shape 4b --tokens 48

Three greedy decodes of the same prompt on the same checkpoint, alternated and repeated (best of
each kept): mlx-lm's generate_step (the peer), ours with no processor, and ours inside a tool call
whose arguments llguidance constrains (the mask is computed and applied every token; a free-text
string argument keeps the call going for the whole run). Prints ms/token and the overhead. Never
asserted anywhere: timings on shared machines are noisy, so compare the ratios.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import mlx.core as mx

from benchmarks.checkpoints import checkpoint

NOTE_TOOL = {
    "type": "function",
    "function": {
        "name": "write_note",
        "description": "Write a note.",
        "parameters": {
            "type": "object",
            "properties": {"title": {"enum": ["todo", "idea"]}, "text": {"type": "string"}},
            "required": ["title", "text"],
        },
    },
}


def ms_per_token(tokens: Any) -> float:
    """Mean milliseconds between tokens after the first (decode only, prefill excluded)."""
    times = []
    for _ in tokens:
        times.append(time.perf_counter())
    return 1000 * (times[-1] - times[0]) / (len(times) - 1)


def mlx_lm_decode(model: Any, prompt: list[int], count: int) -> float:
    """The peer: mlx-lm's own generator, greedy."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    steps = generate_step(
        mx.array(prompt), model, max_tokens=count, prompt_cache=make_prompt_cache(model)
    )
    return ms_per_token(token for token, _ in steps)


def ours_decode(model: Any, prompt: list[int], count: int, processors: list) -> float:
    """Ours, greedy, with the given logits processors."""
    from qwen3_mlx.cache import make_cache
    from qwen3_mlx.generate import generate_tokens

    tokens = generate_tokens(
        model, prompt, make_cache(model), max_tokens=count, logits_processors=processors
    )
    return ms_per_token(tokens)


def constrained_processors(tokenizer: Any, vocab: int) -> list:
    """A guide already inside a call to write_note, past `{"name": "write_note", "arguments":
    {"title": "todo", "text": "`, so every measured token is masked by the schema."""
    from qwen3_mlx.thinking import TOOL_CALL_START_ID, Phase
    from qwen3_mlx.tool_choice import ArgumentGrammar, ToolCallGuide

    grammar = ArgumentGrammar(tokenizer, [NOTE_TOOL], vocab)
    guide = ToolCallGuide(Phase.ANSWER, grammar=grammar)
    opening = '\n{"name": "write_note", "arguments": {"title": "todo", "text": "'
    for token in [TOOL_CALL_START_ID, *tokenizer.encode(opening)]:
        guide._advance(token)
    return [guide]


def main() -> None:
    """Run the three decodes, alternated, and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="0.6b", choices=["0.6b", "4b"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="a local model folder instead of a built checkpoint")
    args = parser.parse_args()

    from mlx_lm.utils import load as mlx_lm_load

    from qwen3_mlx.loading import load

    folder = args.model or checkpoint(args.shape, args.bits)
    print(f"loading {folder}", flush=True)
    ours, tokenizer, _ = load(folder)
    theirs, _ = mlx_lm_load(str(folder))
    prompt = tokenizer.encode("Write a long note about the moon and the sea. " * 4)
    best: dict[str, float] = {}
    for _ in range(args.repeats):
        runs = {
            "mlx-lm generate_step": lambda: mlx_lm_decode(theirs, prompt, args.tokens),
            "qwen3-mlx": lambda: ours_decode(ours, prompt, args.tokens, []),
            "qwen3-mlx, constrained call": lambda: ours_decode(
                ours, prompt, args.tokens, constrained_processors(tokenizer, ours.args.vocab_size)
            ),
        }
        for name, run in runs.items():
            value = run()
            print(f"  {name}: {value:.2f} ms/token", flush=True)
            best[name] = min(best.get(name, float("inf")), value)
    plain = best["qwen3-mlx"]
    label = args.model or f"Qwen3-{args.shape} shape, {args.bits}-bit"
    print(f"{label}, {args.tokens} tokens, best of {args.repeats}")
    for name, value in best.items():
        print(f"  {name:<30} {value:7.2f} ms/token   {value / plain:5.2f}x ours")
    overhead = best["qwen3-mlx, constrained call"] - plain
    print(f"  constraint cost: {overhead:.2f} ms/token ({100 * overhead / plain:.1f} % of decode)")


if __name__ == "__main__":
    main()
