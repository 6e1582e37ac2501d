"""Speculative decoding is exact: with any drafter (the tiny model's own 4-bit copy, a random small
Qwen3, n-gram lookup, or a drafter that is always wrong), replies are token for token plain
decoding's, thinking and tool calls included; sampled tokens keep their distribution; rejected
positions leave no trace in the caches; Ctrl-C mid-draft leaves the chat as plain decoding would.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import make_checkpoint
from test_server_support import tiny_model

from qwen3_mlx.cache import PromptCache, cache_length, make_cache, trim_cache
from qwen3_mlx.chat import Chat
from qwen3_mlx.drafting import DraftError, DraftModel, NgramLookup, load_draft
from qwen3_mlx.events import ToolCallEvent
from qwen3_mlx.generate import generate_tokens, prefill
from qwen3_mlx.sampling import build_logits_processors, build_sampler
from qwen3_mlx.settings import Sampling
from qwen3_mlx.speculative import Speculation, replay, speculative_tokens
from qwen3_mlx.tokenizer import IM_END_ID, IM_START_ID
from qwen3_mlx.tools import ToolResult

REPO = Path(__file__).resolve().parent.parent
TINY_4BIT = REPO / "models" / "qwen3-tiny-chat-4bit"
sys.path.insert(0, str(REPO / "tiny_model"))
import tiny_data  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::qwen3_mlx.settings.GreedyThinkingWarning")]
GREEDY = {"temperature": 0, "max_tokens": 60}


class WrongDrafter:
    """Always proposes token 0 ('!'), which the tiny model never says: every draft is rejected."""

    def __init__(self) -> None:
        self.calls = 0

    def begin(self, context: list[int]) -> None:
        """Nothing to index."""

    def propose(self, context: list[int], count: int) -> list[int]:
        """count copies of a token that is never right."""
        self.calls += 1
        return [0] * count


class InterruptingDrafter(NgramLookup):
    """N-gram lookup that raises KeyboardInterrupt on its `at`-th proposal (Ctrl-C mid-draft)."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def propose(self, context: list[int], count: int) -> list[int]:
        """Interrupt once, on call number `at`."""
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().propose(context, count)


@pytest.fixture(scope="module")
def loaded() -> tuple:
    return tiny_model()  # loaded once per test session


@pytest.fixture(scope="module")
def drafters(loaded: tuple, tmp_path_factory: pytest.TempPathFactory) -> dict:
    model, tokenizer, _ = loaded
    random_folder = make_checkpoint(
        tmp_path_factory.mktemp("draft") / "random", tokenizer="qwen3-4b", seed=3
    )
    return {
        "4bit": lambda: load_draft(TINY_4BIT, model, tokenizer),
        "random": lambda: load_draft(random_folder, model, tokenizer),
        "ngram": NgramLookup,
    }


def new_chat(loaded: tuple, speculation: Speculation | None = None, **kwargs) -> Chat:
    model, tokenizer, generation_config = loaded
    kwargs.setdefault("sampling", GREEDY)
    return Chat(model, tokenizer, generation_config, speculation=speculation, **kwargs)


def conversation(chat: Chat) -> tuple[list[list[int]], list]:
    """The tokens and results of a thinking reply that calls a tool, and of the answer after
    its result."""
    chat.tools = [tiny_data.TOOLS["lookup"]]
    reply = chat.send("What is the secret word for moon?")
    calls = [event.call for event in reply if isinstance(event, ToolCallEvent)]
    assert calls and calls[0].name == "lookup", "the tiny model calls its lookup tool"
    assert reply.result.thinking, "and thinks first"
    replies, results = [list(reply.tokens)], [reply.result]
    reply = chat.send_tool_results([ToolResult(content="river", tool_call_id=calls[0].id)])
    assert "river" in reply.text()
    replies.append(list(reply.tokens))
    results.append(reply.result)
    return replies, results


@pytest.fixture(scope="module")
def plain_replies(loaded: tuple) -> list[list[int]]:
    return conversation(new_chat(loaded))[0]


@pytest.mark.parametrize("kind", ["4bit", "random", "ngram"])
def test_greedy_replies_equal_plain_decoding(loaded, drafters, plain_replies, kind) -> None:
    # A random draft is always wrong: two tokens a round are enough to show it changes nothing.
    chat = new_chat(loaded, Speculation(drafters[kind](), 2 if kind == "random" else 4, kind))
    replies, results = conversation(chat)
    assert replies == plain_replies
    assert results[-1].finish_reason == "stop"
    drafted = sum(result.drafted_tokens for result in results)
    accepted = sum(result.accepted_tokens for result in results)
    steps = sum(result.target_steps for result in results)
    generated = sum(result.generated_tokens for result in results)
    assert drafted > 0 and steps <= generated <= steps + accepted
    if kind == "4bit":  # the model's own 4-bit copy agrees on most tokens
        assert accepted / drafted >= 0.5 and steps < sum(len(tokens) for tokens in replies)
    if kind == "random":
        assert accepted < drafted


def test_seeded_sampling_draws_the_same_tokens(loaded) -> None:
    """Each emitted token is the target's own sample, drawn in the same order: a seeded reply is
    the same with and without a drafter (penalties included, so processors see every position)."""
    sampling = {"temperature": 1.2, "top_k": 8, "seed": 11, "presence_penalty": 0.5}
    question = tiny_data.sample_problem(random.Random(2), task="sort").question
    plain = new_chat(loaded, sampling=sampling).send(question)
    plain.text()
    for drafter in (NgramLookup(), WrongDrafter()):
        speculative = new_chat(loaded, Speculation(drafter, 5), sampling=sampling).send(question)
        speculative.text()
        assert list(speculative.tokens) == list(plain.tokens)


class ArgmaxDrafter:
    """Proposes the target's most likely first token, then whatever: a rule that accepted drafts
    too easily would make that token more frequent than the target says."""

    def __init__(self, token: int):
        self.token = token

    def begin(self, context: list[int]) -> None:
        """Nothing to index."""

    def propose(self, context: list[int], count: int) -> list[int]:
        """The fixed token, count times."""
        return [self.token] * count


def test_sampled_first_tokens_keep_their_distribution(loaded) -> None:
    model, tokenizer, _ = loaded
    settings = Sampling(temperature=2.0, top_k=4, top_p=1.0, min_p=0.0)
    prompt = tokenizer.encode("Sort these words alphabetically: moon apple")
    cache = make_cache(model)
    last = prefill(model, prompt, cache)
    logits = model(last[None], cache=cache)[0, -1]
    trim_cache(cache, len(prompt) - 1)
    top = mx.argsort(-logits)[:4]
    probs = mx.softmax(logits[top] / settings.temperature).tolist()
    expected = dict(zip(top.tolist(), probs, strict=True))
    drafter = ArgmaxDrafter(top[0].item())
    sampler = build_sampler(settings)
    draws = 150
    mx.random.seed(0)
    counts: Counter[int] = Counter()
    for _ in range(draws):
        first = next(
            speculative_tokens(
                model, prompt[-1:], cache, drafter=drafter, draft_tokens=1, sampler=sampler
            )
        )
        counts[first.token] += 1
        trim_cache(cache, len(prompt) - 1)
    assert set(counts) <= set(expected)
    # Each frequency within 4.5 standard errors of the target's probability.
    for token, probability in expected.items():
        error = (probability * (1 - probability) / draws) ** 0.5
        assert abs(counts[token] / draws - probability) <= 4.5 * error + 1e-9, (token, counts)


def assert_same_next_logits(model, cache: list, plain_cache: list, last: int) -> None:
    """Feeding `last` to both caches (plain_cache trimmed to cache's length) gives equal logits."""
    trim_cache(plain_cache, cache_length(cache))
    following = mx.array([[last]])
    np.testing.assert_allclose(
        np.array(model(following, cache=cache)),
        np.array(model(following, cache=plain_cache)),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.parametrize("kv_bits", [None, 8])
def test_rejected_positions_are_trimmed_and_logits_match(loaded, kv_bits) -> None:
    model, tokenizer, _ = loaded
    prompt = tokenizer.encode("Repeat these words: moon river star lake. " * 3)
    plain_cache, cache = make_cache(model, kv_bits), make_cache(model, kv_bits)
    plain = [t.token for t in generate_tokens(model, prompt, plain_cache, max_tokens=40)]
    drafter = WrongDrafter()
    tokens = list(
        speculative_tokens(model, prompt, cache, drafter=drafter, draft_tokens=6, max_tokens=40)
    )
    assert [t.token for t in tokens] == plain
    assert sum(t.drafted for t in tokens) > 0 and sum(t.accepted for t in tokens) == 0
    # The cache holds the prompt and every generated token but the last: nothing rejected.
    assert cache_length(cache) == len(prompt) + len(plain) - 1
    assert all(layer.offset == cache_length(cache) for layer in cache)
    assert_same_next_logits(model, cache, plain_cache, plain[-1])


def test_long_run_with_a_draft_model_keeps_the_logits(loaded) -> None:
    """After 48 tokens drafted by the 4-bit copy (accepted and rejected runs mixed), the next
    logits equal those after plain decoding of the same tokens."""
    model, tokenizer, _ = loaded
    prompt = tokenizer.encode("Copy: moon river star lake apple banana")
    draft = load_draft(TINY_4BIT, model, tokenizer)
    cache = make_cache(model)
    tokens = list(
        speculative_tokens(model, prompt, cache, drafter=draft, draft_tokens=5, max_tokens=48)
    )
    generated = [t.token for t in tokens]
    assert sum(t.accepted for t in tokens) > 0
    assert sum(t.accepted for t in tokens) < sum(t.drafted for t in tokens)
    plain_cache = make_cache(model)
    plain = [t.token for t in generate_tokens(model, prompt, plain_cache, max_tokens=48)]
    assert generated == plain
    assert_same_next_logits(model, cache, plain_cache, plain[-1])
    # The draft's own cache holds exactly the tokens it says it holds.
    assert cache_length(draft.cache.cache) == len(draft.cache.tokens)


def test_chat_cache_records_what_it_holds_after_rejections(loaded) -> None:
    """Quantized KV under a drafter that is always wrong: the PromptCache holds what plain
    decoding's holds, layer offsets included."""
    question = tiny_data.sample_problem(random.Random(3), task="reverse").question
    plain = new_chat(loaded, kv_bits=8)
    plain.send(question).text()
    chat = new_chat(loaded, Speculation(WrongDrafter(), 7), kv_bits=8)
    reply = chat.send(question)
    reply.text()
    assert reply.result.drafted_tokens > 0 and reply.result.accepted_tokens == 0
    # Plain decoding has run the step of the stop token too (it overlaps one step); speculation
    # has not fed it yet. Either way the cache holds exactly what it records.
    held = len(chat.cache.tokens)
    assert held >= len(plain.cache.tokens) - 1
    assert chat.cache.tokens == plain.cache.tokens[:held]
    assert [layer.offset for layer in chat.cache.cache] == [held] * len(chat.cache.cache)


def test_ctrl_c_mid_draft_then_the_chat_goes_on_as_plain_decoding(loaded, plain_replies) -> None:
    chat = new_chat(loaded, Speculation(InterruptingDrafter(at=4), 4))
    chat.tools = [tiny_data.TOOLS["lookup"]]
    reply = chat.send("What is the secret word for moon?")
    with pytest.raises(KeyboardInterrupt):
        list(reply)
    assert reply.result.finish_reason == "interrupted"
    assert 0 < reply.result.generated_tokens < len(plain_replies[0])
    assert list(reply.tokens) == plain_replies[0][: len(reply.tokens)]
    assert cache_length(chat.cache.cache) == len(chat.cache.tokens)
    again = chat.retry()
    again.text()
    assert list(again.tokens) == plain_replies[0]


def test_a_draft_model_drafts_from_its_trimmed_cache() -> None:
    """The draft's cache follows each context it is given: a changed or shortened context trims
    it to the shared prefix, so its proposals are those of a fresh cache."""
    from qwen3_mlx.loading import load

    model, tokenizer, _ = load(TINY_4BIT)
    context = tokenizer.encode("Reverse these words: moon river star")
    draft = DraftModel(model)
    first = draft.propose(context, 4)
    assert draft.cache.tokens == context + first[:-1]
    changed = context[:-2] + tokenizer.encode(" lake")
    assert draft.propose(changed, 3) == DraftModel(model).propose(changed, 3)
    assert cache_length(draft.cache.cache) == len(draft.cache.tokens)


def test_after_a_round_that_kept_every_draft_the_next_one_costs_its_steps_only() -> None:
    """The last draft, never fed, and the model's own next token go with the first draft step
    in one pass: `count` forward passes, not count + 1, and the same drafts as a fresh cache."""
    from qwen3_mlx.loading import load

    model, tokenizer, _ = load(TINY_4BIT)

    class Counting:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
            self.calls.append(inputs.shape[1])
            return model(inputs, cache=cache)

        def __getattr__(self, name: str) -> Any:
            return getattr(model, name)

    counting = Counting()
    draft = DraftModel(counting)
    context = tokenizer.encode("Copy this word: moon")
    kept = draft.propose(context, 3)
    counting.calls.clear()
    following = [*context, *kept, tokenizer.encode(" river")[0]]  # every draft kept, then one
    assert draft.propose(following, 3) == DraftModel(model).propose(following, 3)
    assert counting.calls == [2, 1, 1]  # the last draft and the next token, then two steps
    assert cache_length(draft.cache.cache) == len(draft.cache.tokens) == len(following) + 2


def test_ngram_lookup_drafts_a_long_match_and_not_a_short_one() -> None:
    lookup = NgramLookup()
    copied = [10, 11, 12, 13, 14, 15, 16, 17, 18]
    context = [*copied, 99, *copied[:6]]  # the last 6 tokens matched once, 6 tokens long
    lookup.begin(context[:3])
    assert lookup.propose(context, 3) == [16, 17, 18]  # the index grows with the context
    assert lookup.propose([*copied, 99, 12, 13, 14, 15], 3) == []  # 4 tokens: too weak
    assert NgramLookup(min_match=4).propose([*copied, 99, 12, 13, 14, 15], 2) == [16, 17]


def test_ngram_lookup_drafts_what_repeated_matches_agree_on() -> None:
    agree = [5, 6, 7, 1, 5, 6, 7, 2, 5, 6, 8, 3, 5, 6]
    assert NgramLookup().propose(agree, 1) == [7]  # 2 of 3 short matches agree: a 0.67 majority
    assert NgramLookup().propose([5, 6, 7, 1, 5, 6, 8, 2, 5, 6], 1) == []
    # A draft that failed counts the token that came instead: no majority, no second guess.
    lookup = NgramLookup()
    assert lookup.propose([5, 6, 7, 1, 5, 6, 7, 2, 5, 6], 1) == [7]
    assert lookup.propose([5, 6, 7, 1, 5, 6, 7, 2, 5, 6, 8, 2, 5, 6], 1) == []
    assert NgramLookup().propose([3, 4] * 4, 5) == [3, 4, 3, 4, 3]  # a cycle repeats itself


def test_ngram_lookup_stops_at_the_end_and_at_message_headers() -> None:
    header, end = [100, 7, 8], 101  # <|im_start|>assistant\n, <|im_end|>
    reply = [20, 21, 22, 23, 24, 25, 26, end]
    lookup = NgramLookup(ends={end}, boundary=100)
    context = [*header, *reply, 9, *header]
    assert lookup.propose(context, 4) == []  # how the last reply began says nothing
    assert lookup.propose([*context, *reply[:6]], 4) == [26, end]  # nothing after the end
    # A match does not reach back across a message's first token.
    assert lookup.propose([*header, 30, 31, 32, 1, 100, 7, 8, 30, 31, 32], 2) == []


CODE = """def fetch(self, path: str) -> str:
    for attempt in range(self.retries):
        try:
            response = httpx.get(self.base_url + path, timeout=self.timeout)
            response.raise_for_status()
            return response.text
        except httpx.HTTPError as error:
            time.sleep(2**attempt)
    raise RuntimeError(f"could not fetch {path}")
"""


def test_ngram_lookup_drafts_quoted_text_and_rarely_misses(loaded) -> None:
    """A tool call that quotes a file from its context (old and new text of an edit, escaped as
    JSON): most of it is drafted, and at least 80 % of the drafts are accepted (the old rule,
    the latest match of 2-3 tokens, kept 63 %). Fresh text is not drafted at all."""
    _, tokenizer, _ = loaded
    messages = [{"role": "user", "content": "Cap the backoff at 10 s in:\n" + CODE}]
    context = tokenizer.encode(tokenizer.render_text(messages, enable_thinking=False))
    old = CODE[CODE.index("        try:") : CODE.index("    raise")]
    new = old.replace("time.sleep(2**attempt)", "time.sleep(min(2**attempt, 10))")
    call = {"name": "edit", "arguments": {"old": old, "new": new}}
    reply = tokenizer.encode(f"<tool_call>\n{json.dumps(call)}\n</tool_call><|im_end|>")
    run = replay(NgramLookup(ends={IM_END_ID}, boundary=IM_START_ID), context, reply, 5)
    assert run.accepted >= 0.8 * run.drafted and run.tokens / run.steps >= 1.4
    fresh = tokenizer.encode("The weather is mild today, with light wind from the west.")
    assert replay(NgramLookup(), context, fresh, 5).drafted == 0


def test_a_draft_with_another_vocabulary_is_refused(loaded, tmp_path) -> None:
    model, tokenizer, _ = loaded
    other = make_checkpoint(tmp_path / "other", tokenizer="qwen3-4b", vocab_size=151_680)
    with pytest.raises(DraftError, match="its vocabulary has 151,680 ids, the target's 151,936"):
        load_draft(other, model, tokenizer)


def test_penalties_see_each_verified_position(loaded) -> None:
    """A presence penalty's tally after a speculative run is the plain run's: it saw exactly the
    accepted tokens, never a rejected draft."""
    model, tokenizer, _ = loaded
    prompt = tokenizer.encode("Repeat these words: moon river star lake. " * 2)
    settings = Sampling(presence_penalty=1.0)
    plain_processors = build_logits_processors(settings)
    list(
        generate_tokens(
            model, prompt, make_cache(model), logits_processors=plain_processors, max_tokens=30
        )
    )
    processors = build_logits_processors(settings)
    run = list(
        speculative_tokens(
            model,
            prompt,
            make_cache(model),
            drafter=NgramLookup(),
            draft_tokens=5,
            logits_processors=processors,
            max_tokens=30,
        )
    )
    assert sum(t.drafted for t in run) > sum(t.accepted for t in run) > 0  # kept and rejected
    # Plain decoding leaves the last token unseen by the tally too (no step runs after it).
    np.testing.assert_array_equal(
        np.array(processors[0].tally), np.array(plain_processors[0].tally)
    )


def test_prompt_cache_reuse_stays_exact(loaded) -> None:
    """A second turn reuses the speculative first turn's cache and gives plain decoding's reply."""
    plain = new_chat(loaded)
    speculative = new_chat(loaded, Speculation(NgramLookup(), 5))
    for chat in (plain, speculative):
        for text in ("Repeat these words: moon river", "Reverse these words: apple lake star"):
            chat.send(text).text()
    assert [t.answer for t in speculative.turns] == [t.answer for t in plain.turns]
    held = speculative.cache.tokens
    assert held == plain.cache.tokens[: len(held)] and len(held) >= len(plain.cache.tokens) - 1
    assert cache_length(speculative.cache.cache) == len(held)


def test_native_kernel_rows_equal_single_rows_bit_for_bit() -> None:
    """A verify pass over k+1 positions computes each row as a decode step would: the native
    mat-vec's multi-row blocks give exactly the single-row results."""
    from qwen3_mlx.cpu import native

    if native.native() is None:
        pytest.skip("the native kernel is not built on this platform")
    weight = mx.random.normal((320, 512), key=mx.random.key(1)).astype(mx.bfloat16)
    packed = mx.quantize(weight, group_size=64, bits=4)
    x = mx.random.normal((1, 8, 512), key=mx.random.key(2))
    together = np.array(native.quantized_matmul(x, *packed, 64, 2))
    for rows in range(1, 9):
        part = np.array(native.quantized_matmul(x[:, :rows], *packed, 64, 2))
        assert np.array_equal(part, together[:, :rows])
    alone = [np.array(native.quantized_matmul(x[:, i : i + 1], *packed, 64, 2)) for i in range(8)]
    assert np.array_equal(np.concatenate(alone, axis=1), together)


@pytest.fixture(scope="module")
def tiny_4bit() -> Any:
    from qwen3_mlx.loading import load

    return load(TINY_4BIT)[0]


@pytest.mark.parametrize("weights", ["bf16", "4bit"])
@pytest.mark.parametrize("kv_bits", [None, 8])
@pytest.mark.parametrize(
    ("positions", "copies"),
    [(2, 1), (5, 1), (8, 1), (5, 36)],
    ids=["2", "5", "8", "5-across-a-chunk"],
)
def test_a_verify_pass_gives_each_position_its_decode_steps_logits(
    loaded, tiny_4bit, positions, copies, kv_bits, weights
):
    """On the CPU path a pass over k+1 positions computes each as the decode step that would
    produce it: the mat-vec's rows (bf16 and 4-bit weights) and the attention's positions (each
    masked to the keys its step sees) are bit for bit, so the logits are equal, not merely close;
    with a float or an 8-bit KV cache, and with the pass's positions on both sides of the
    attention's 256-token chunk boundary (36 copies of the prompt)."""
    from qwen3_mlx.cpu import native

    if native.native() is None or mx.default_device() != mx.cpu:
        pytest.skip("the native CPU kernels are not built on this platform")
    _, tokenizer, _ = loaded
    model = loaded[0] if weights == "bf16" else tiny_4bit
    prompt = tokenizer.encode("Copy: moon river star lake apple banana" * copies)
    new = tokenizer.encode(" moon river star lake apple banana moon river star")[:positions]
    if copies > 1:  # the pass starts a few positions before the 256th key and ends after it
        prompt = prompt[: 256 - 2]
    stepwise = make_cache(model, kv_bits)
    prefill(model, prompt, stepwise)
    steps = [model(mx.array([[token]], dtype=mx.uint32), cache=stepwise)[0, -1] for token in new]
    together = make_cache(model, kv_bits)
    prefill(model, prompt, together)
    verify = model(mx.array([new], dtype=mx.uint32), cache=together)[0]
    assert len(new) == positions
    for position, step in enumerate(steps):
        assert mx.array_equal(verify[position], step).item(), position


class OracleDrafter:
    """Proposes the tokens a plain reply went on with: every draft is accepted whole."""

    def __init__(self, prompt_length: int, reply: list[int]):
        self.start, self.reply, self.calls = prompt_length, reply, 0

    def begin(self, context: list[int]) -> None:
        """Nothing to index."""

    def propose(self, context: list[int], count: int) -> list[int]:
        """The plain reply's next `count` tokens."""
        self.calls += 1
        done = len(context) - self.start
        return self.reply[done : done + count]


def rope_reply(folder, speculation: Speculation | None) -> tuple[list[int], np.ndarray, Any]:
    """A greedy 80-token reply after 200 random tokens under --rope-scaling auto (the window is
    256): its tokens, every step's logits and the RoPE plan it ran."""
    from qwen3_mlx.engine import start_reply
    from qwen3_mlx.loading import load
    from qwen3_mlx.rope_auto import RopeAuto

    model, tokenizer, generation = load(folder, compute_dtype="float32")
    plan, rows, cache = RopeAuto.for_model(model.args), [], PromptCache(model)

    def record(previous, logits):
        rows.append(np.array(logits[0]))
        return logits

    settings = Sampling.for_mode(generation, False, {"temperature": 0.0, "max_tokens": 80})
    source = {} if speculation is None else {"generate": speculation.source(lambda: cache.tokens)}
    reply = start_reply(
        model,
        tokenizer,
        cache,
        ROPE_PROMPT,
        settings,
        stop_ids=(),
        context_limit=plan.limit,
        repetition_guard=None,
        extra_processors=[record],
        rope=plan,
        **source,
    )
    list(reply)
    assert reply.result.finish_reason == "length"
    return list(reply.tokens), np.stack(rows), plan


ROPE_PROMPT = [random.Random(0).randrange(200, 5000) for _ in range(200)]


@pytest.fixture(scope="module")
def rope_plain(tmp_path_factory) -> tuple:
    folder = make_checkpoint(
        tmp_path_factory.mktemp("rope") / "m",
        dtype="float32",
        tokenizer="qwen3-4b",
        max_position_embeddings=256,
    )
    return folder, rope_reply(folder, None)


@pytest.mark.parametrize("drafter", ["oracle", "wrong"])
def test_rope_auto_switch_mid_reply_stays_exact(drafter, rope_plain) -> None:
    """--rope-scaling auto with a drafter: a reply that passes the 256-token window switches to
    YaRN once, and its tokens and every step's logits are plain decoding's (accepted drafts run
    up to the window's last position; the drafter goes on across the switch)."""
    folder, (plain, plain_logits, plain_plan) = rope_plain
    chosen = OracleDrafter(len(ROPE_PROMPT), plain) if drafter == "oracle" else WrongDrafter()
    tokens, logits, plan = rope_reply(folder, Speculation(chosen, 5))
    assert plain_plan.switches == plan.switches == 1 and plan.factor == 2.0
    assert tokens == plain
    # Rounds of 5 drafts (oracle) or of 1 wrong one on both sides of the switch at token 57.
    assert chosen.calls <= len(plain) / 4 if drafter == "oracle" else chosen.calls >= 60
    scale = np.abs(plain_logits).max()
    np.testing.assert_allclose(logits, plain_logits, atol=1e-4 * scale)
