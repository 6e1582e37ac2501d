"""Continuous batching without HTTP: the BatchDecoder against single runs, and the queue bound."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from test_server_support import tiny_model

from qwen3_mlx.batching import BatchDecoder, BatchRow
from qwen3_mlx.cache import kv_bytes_per_token, make_cache
from qwen3_mlx.generate import greedy
from qwen3_mlx.sampling import PresencePenalty, build_sampler
from qwen3_mlx.server.prefix_cache import PrefixCache, cache_bytes
from qwen3_mlx.server.worker import Failed, Finished, GenerationWorker, Job, ServerBusy
from qwen3_mlx.settings import Sampling
from qwen3_mlx.tokenizer import IM_END_ID

TASKS = ("moon river", "apple lake star", "tree", "snow fish moon apple")
SAMPLED = Sampling(temperature=0.6, top_k=20, top_p=0.95, min_p=0.0)


def _prompt(tokenizer, words: str) -> list[int]:
    messages = [{"role": "user", "content": "Reverse these words: " + words}]
    text = tokenizer.render_text(messages, add_generation_prompt=True, enable_thinking=True)
    return tokenizer.encode(text)


def _row(model, prompt, index: int, max_tokens: int = 16) -> BatchRow:
    # Row 1 samples at T 0.6 with a presence penalty, the others are greedy: one batch mixes both.
    sampled = index == 1
    return BatchRow(
        prompt,
        make_cache(model),
        sampler=build_sampler(SAMPLED) if sampled else greedy,
        processors=[PresencePenalty(0.5)] if sampled else [],
        max_tokens=max_tokens,
        seed=100 + index,
    )


def _drain(decoder: BatchDecoder) -> None:
    while not decoder.idle:
        decoder.run_once()


def test_batched_rows_match_single_runs_token_for_token():
    model, tokenizer, _ = tiny_model()
    prompts = [_prompt(tokenizer, words) for words in TASKS]
    single = []
    for index, prompt in enumerate(prompts):
        decoder = BatchDecoder(model, {IM_END_ID})
        row = _row(model, prompt, index)
        decoder.add(row)
        _drain(decoder)
        single.append([item.token for item in row])

    decoder = BatchDecoder(model, {IM_END_ID})
    rows = [_row(model, prompt, index) for index, prompt in enumerate(prompts[:3])]
    for row in rows:
        decoder.add(row)
    for _ in range(6):  # the first three are decoding together when the fourth joins
        decoder.run_once()
    assert len(decoder.rows) == 3
    late = _row(model, prompts[3], 3)
    decoder.add(late)
    _drain(decoder)
    batched = [[item.token for item in row] for row in [*rows, late]]
    assert batched == single
    # Each row's cache holds its prompt and its tokens (the last was fed by the step that
    # overlapped handing it out), for the prefix cache.
    for row, prompt, tokens in zip([*rows, late], prompts, batched, strict=True):
        assert row.cache[0].offset == len(prompt) + len(tokens)


def test_a_closed_row_leaves_the_batch_and_the_others_go_on():
    model, tokenizer, _ = tiny_model()
    prompts = [_prompt(tokenizer, words) for words in TASKS[:2]]
    decoder = BatchDecoder(model, stop_ids=())
    rows = [_row(model, prompt, 0, max_tokens=12) for prompt in prompts]
    for row in rows:
        decoder.add(row)
    decoder.run_once()
    decoder.run_once()
    assert len(decoder.rows) == 2
    rows[0].closed.set()
    decoder.run_once()
    assert decoder.rows == [rows[1]] and rows[0].released.is_set()
    _drain(decoder)
    assert len(list(rows[1])) == 12


def test_the_queue_bound_refuses_with_server_busy():
    model, tokenizer, _ = tiny_model()
    worker = GenerationWorker(
        model,
        tokenizer,
        PrefixCache(model, 1 << 20),
        stop_ids=frozenset({IM_END_ID}),
        context_limit=1024,
        max_batch=1,
        max_queue=1,
    )  # not started: nothing leaves the queue
    worker.running = 1  # the batch is full
    worker.submit(Job([1, 2], Sampling(), lambda item: None))
    with pytest.raises(ServerBusy, match="max-queue 1"):
        worker.submit(Job([1, 2], Sampling(), lambda item: None))
    assert worker.queued == 1


def test_a_busy_entry_is_forked_never_shared():
    model, tokenizer, _ = tiny_model()
    cache = PrefixCache(model, 1 << 30)
    prompt = _prompt(tokenizer, "moon river")
    first = cache.choose(prompt)
    model(mx.array(prompt, dtype=mx.uint32)[None], cache=first.cache.cache)  # what a reply does
    first.cache.tokens = list(prompt)
    while_busy = cache.choose(prompt + [198])
    assert while_busy.cache is not first.cache and while_busy.cached_tokens == len(prompt)
    cache.release(first.cache)
    after = cache.choose(prompt + [271])
    assert after.cache is first.cache and after.cached_tokens == len(prompt)


def test_kv_bits_keeps_idle_entries_quantized_and_reuses_their_prefix():
    """serve --kv-bits 8: a released entry is kept quantized (its packed bytes counted against
    the bound); a prompt sharing its prefix gets a float copy, close to the float cache, and a
    worker answers through it as without it."""
    model, tokenizer, _ = tiny_model()
    prompt = _prompt(tokenizer, "moon river")
    caches = {bits: PrefixCache(model, 1 << 30, kv_bits=bits) for bits in (None, 8)}
    for cache in caches.values():
        first = cache.choose(prompt)
        model(mx.array(prompt, dtype=mx.uint32)[None], cache=first.cache.cache)
        first.cache.tokens = list(prompt)
        cache.release(first.cache)
    # A prompt that parts from the entry one token early: a fork, so the entry stays.
    other = prompt[:-1] + [198]
    plain, quantized = (caches[bits].choose(other) for bits in (None, 8))
    assert plain.cached_tokens == quantized.cached_tokens == len(prompt) - 1
    assert quantized.cache.kv_bits is None  # the batch decodes in float
    kept = caches[8].entries[0]
    assert kept.kv_bits == 8 and kept.tokens == prompt
    # Its packed bytes (8 bits and a bf16 scale and bias per 64) are what the bound counts.
    assert cache_bytes(kept) == len(prompt) * kv_bytes_per_token(model.args, 8, 2)
    layer, reference = quantized.cache.cache[0], plain.cache.cache[0]
    error = mx.abs(layer.keys - reference.keys[..., : len(prompt) - 1, :]).max().item()
    assert error < 0.02 * mx.abs(reference.keys).max().item()

    worker = GenerationWorker(
        model,
        tokenizer,
        PrefixCache(model, 1 << 30, kv_bits=8),
        stop_ids=frozenset({IM_END_ID}),
        context_limit=1024,
        max_batch=2,
        max_queue=2,
    )
    worker.start()
    try:
        finished = [_run(worker, prompt) for _ in range(2)]
    finally:
        worker.stop()
    assert [item.result.answer for item in finished] == ["river moon"] * 2
    assert finished[1].cached_tokens == len(prompt) - 1


def _run(worker: GenerationWorker, prompt: list[int]) -> Finished:
    import queue

    items: queue.SimpleQueue = queue.SimpleQueue()
    worker.submit(Job(prompt, Sampling(temperature=0.0, max_tokens=64), items.put))
    while not isinstance(item := items.get(timeout=60), Finished | Failed):
        pass
    assert isinstance(item, Finished), item
    return item


def test_a_stopped_worker_lets_the_process_exit_0():
    # A race at interpreter finalization (exit 134 in about 1 run of 3 before the decoding thread
    # cleared its MLX streams): three runs side by side catch it 7 times in 10.
    script = Path(__file__).with_name("worker_exit.py")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(script.parent.parent), str(script.parent)]),
    }
    runs = [
        subprocess.Popen([sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    assert results == [(0, "")] * 3
