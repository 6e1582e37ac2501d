"""What each rank runs in the distributed tests (started by `mlx.launch`, one process per rank).

`python distributed_ranks.py OUT THREE_HEADS CHECKPOINT...`: for every checkpoint, each rank loads
the whole model (the single-process reference) and its shard. The shards run a prompt together
(every rank calls the model: full logits of every position), then rank 0 leads 32 greedy tokens
through the engine's generator while the other ranks follow, again speculatively (a drafter half
right: verify passes and trims mirrored), and the same through the server's
batch decoder (rows joining, leaving and forked: every cache operation mirrored). Then the misconfigurations: a model
whose heads do not split, and rank r loading checkpoint r (different files). Last, the CLI:
`qwen3-mlx prompt` with the tiny chat model, in this process, as under `mlx.launch` (rank 0 leads,
rank 1 follows). Each rank writes OUT.<rank>.json with what it saw and printed.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from qwen3_mlx.batching import BatchDecoder, BatchRow
from qwen3_mlx.cache import make_cache
from qwen3_mlx.cache_ops import cache_ops
from qwen3_mlx.cpu.dense import native_dense
from qwen3_mlx.generate import generate_tokens
from qwen3_mlx.generate import greedy as argmax
from qwen3_mlx.loading import load_model
from qwen3_mlx.parallel.distributed import join_group, load_group_model
from qwen3_mlx.parallel.lockstep import LeaderModel, follow
from qwen3_mlx.speculative import speculative_tokens

PROMPT = [3, 141, 59, 26, 5, 35, 89, 79, 32, 38, 46, 26]
TINY_CHAT = Path(__file__).resolve().parent.parent / "models" / "qwen3-tiny-chat"
PROMPT_ARGS = ["prompt", "--model", str(TINY_CHAT), "--temp", "0", "--no-think", "--tools", "none"]
QUESTION = "What is the capital of France?"
GREEDY_TOKENS = 32
BATCH = [(PROMPT, 12), (PROMPT[3:], 5), (PROMPT[:7], 9)]  # (prompt, tokens) of each row


def greedy(model, group=None, kv_bits=None) -> list[int]:
    """32 greedy tokens after PROMPT; with a group, rank 0 leads and the others follow."""
    if group is not None and group.rank() != 0:
        follow(model, group)
        return []
    leader = LeaderModel(model, group) if group is not None else model
    cache = make_cache(model, kv_bits)
    tokens = [t.token for t in generate_tokens(leader, PROMPT, cache, max_tokens=GREEDY_TOKENS)]
    if group is not None:
        leader.stop()
    return tokens


class HalfRightDrafter:
    """Proposes the expected greedy tokens with every other draft's last token wrong: accepted
    runs and rejected positions alternate (each trimmed on every rank)."""

    def __init__(self, expected: list[int]):
        self.expected, self.rounds = expected, 0

    def begin(self, context: list[int]) -> None:
        """Nothing to index."""

    def propose(self, context: list[int], count: int) -> list[int]:
        """The expected next `count` tokens, the last one off by one every other round."""
        done = len(context) - len(PROMPT)
        guess = list(self.expected[done : done + count])
        self.rounds += 1
        if guess and self.rounds % 2 == 0:
            guess[-1] += 1
        return guess


def speculative(model, group, expected: list[int]) -> dict:
    """The greedy tokens decoded speculatively with rank 0 leading (the followers run its verify
    passes, every position's logits gathered), and how many drafts were kept or not."""
    if group.rank() != 0:
        follow(model, group)
        return {}
    leader = LeaderModel(model, group)
    drafter = HalfRightDrafter(expected)
    run = list(
        speculative_tokens(
            leader, PROMPT, make_cache(model), drafter=drafter, draft_tokens=3, max_tokens=32
        )
    )
    leader.stop()
    drafted, accepted = sum(t.drafted for t in run), sum(t.accepted for t in run)
    return {"tokens": [t.token for t in run], "accepted": accepted, "rejected": drafted - accepted}


def batched(model, group=None) -> list[list[int]]:
    """Greedy tokens of rows decoded together by the server's BatchDecoder, then of a row in a
    fork of the first row's cache (its prompt and first tokens); with a group, rank 0 leads (merge, extract, keep and fork
    mirrored) and the others follow."""
    if group is not None and group.rank() != 0:
        follow(model, group)
        return []
    leader = LeaderModel(model, group) if group is not None else model
    decoder = BatchDecoder(leader, stop_ids=())

    def row(prompt: list[int], tokens: int, cache=None) -> BatchRow:
        cache = cache or make_cache(model)
        return BatchRow(prompt, cache, sampler=argmax, max_tokens=tokens, seed=0)

    def run(*rows: BatchRow, late: BatchRow | None = None) -> None:
        for each in rows:
            decoder.add(each)
        for _ in range(3):
            decoder.run_once()
        if late is not None:
            decoder.add(late)  # joins a running batch; the rows leave at different steps
        while not decoder.idle:
            decoder.run_once()

    rows = [row(prompt, tokens) for prompt, tokens in BATCH]
    run(rows[0], rows[1], late=rows[2])
    tokens = [[generated.token for generated in each] for each in rows]
    # The fork holds the first row's prompt and 4 of its tokens: extracted from the batch.
    fork = make_cache(model)
    cache_ops(leader).fork(rows[0].cache, len(PROMPT) + 4, fork)
    forked = row(tokens[0][4:8], 4, fork)
    run(forked)
    if group is not None:
        leader.stop()
    return [*tokens, [generated.token for generated in forked]]


def compare(checkpoint: Path, group) -> dict:
    """Logit difference and greedy tokens of the sharded model against the whole one."""
    whole, _ = load_model(checkpoint, compute_dtype="float32")
    ids = mx.array([PROMPT])
    reference = whole(ids)
    expected = greedy(whole)
    kv8 = whole.args.head_dim % 64 == 0  # a quantized KV cache groups 64 along each head
    expected_kv8 = greedy(whole, kv_bits=8) if kv8 else []
    batched_expected = batched(whole)
    shard, _, _ = load_group_model(checkpoint, group, compute_dtype="float32")
    logits = shard(ids)  # every rank calls the model: all positions, no leader
    difference = mx.abs(logits - reference).max().item()
    tokens = greedy(shard, group)
    tokens_kv8 = greedy(shard, group, kv_bits=8) if kv8 else []  # followers quantize theirs too
    weight_dtypes = {
        name: str(array.dtype)
        for name, array in tree_flatten(shard.parameters())
        if name.endswith(("proj.weight", "embed_tokens.weight", "lm_head.weight"))
        and array.dtype != mx.uint32
    }
    return {
        "weight_dtypes": sorted(set(weight_dtypes.values())),
        "logits_dtype": str(logits.dtype),
        "batched_expected": batched_expected,
        "batched": batched(shard, group),
        "max_logit_diff": difference,
        "expected": expected,
        "tokens": tokens,
        "expected_kv8": expected_kv8,
        "tokens_kv8": tokens_kv8,
        "speculative": speculative(shard, group, expected),
    }


def load_error(checkpoint: Path, group) -> str:
    """The error message loading checkpoint over group gives on this rank ('' if none)."""
    try:
        load_group_model(checkpoint, group, compute_dtype="float32")
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    return ""


def run_prompt() -> tuple[int, str]:
    """`qwen3-mlx prompt QUESTION` in this process: its exit status and what it printed."""
    from qwen3_mlx.cli.app import app

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        try:
            app([*PROMPT_ARGS, QUESTION], prog_name="qwen3-mlx")
        except SystemExit as done:
            return int(done.code or 0), printed.getvalue()
    return 0, printed.getvalue()


def main() -> None:
    group = join_group()
    out, three_heads = Path(sys.argv[1]), Path(sys.argv[2])
    checkpoints = [Path(p) for p in sys.argv[3:]]
    results = {path.name: compare(path, group) for path in checkpoints}
    results["native_dense"] = native_dense() is not None
    results["three_heads_error"] = load_error(three_heads, group)
    results["different_files_error"] = load_error(checkpoints[group.rank()], group)
    results["prompt_exit"], results["prompt_printed"] = run_prompt()
    Path(f"{out}.{group.rank()}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
