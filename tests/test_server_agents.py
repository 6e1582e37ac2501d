"""The server with agent clients: Qwen-Agent (default and raw mode) and 8 concurrent clients."""

from __future__ import annotations

import functools
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from test_server_support import API_KEY, running_server

from qwen3_mlx.cache import common_prefix_length
from qwen3_mlx.engine import render_prompt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tiny_model"))
from tiny_data import TOOLS  # noqa: E402  (the tiny model's own tool definitions)

WORDS = ["moon", "river", "apple", "lake", "star", "tree", "fish", "snow"]


@pytest.fixture(scope="module")
def server():
    with running_server(max_concurrency=16) as (url, state):
        yield url, state


def _messages(words: list[str], system: str | None = None) -> list[dict[str, str]]:
    user = [{"role": "user", "content": "Reverse these words: " + " ".join(words)}]
    return user if system is None else [{"role": "system", "content": system}, *user]


def _ask(url: str, messages: list[dict[str, str]], seed: int, max_tokens: int = 64) -> Any:
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    return client.chat.completions.create(
        model="m",
        messages=messages,
        temperature=0 if seed % 2 else 0.6,  # greedy and seeded sampling share the batch
        seed=seed,
        max_tokens=max_tokens,
    )


def _texts(reply: Any) -> tuple[str, str]:
    message = reply.choices[0].message
    return message.content, message.model_extra.get("reasoning_content", "")


def _reverse(url: str, words: list[str], seed: int) -> tuple[str, str]:
    return _texts(_ask(url, _messages(words), seed))


def test_eight_concurrent_clients_match_sequential_runs(server):
    url, state = server
    rng = random.Random(7)
    tasks = [(rng.sample(WORDS, 2), seed) for seed in range(8)]
    sequential = [_reverse(url, words, seed) for words, seed in tasks]
    assert state.worker.decoder.widest == 1
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda task: _reverse(url, *task), tasks))
    assert concurrent == sequential
    assert state.worker.decoder.widest >= 2  # decoded together, not one after another
    correct = sum(
        answer == " ".join(reversed(words))
        for (answer, _), (words, _s) in zip(sequential, tasks, strict=True)
    )
    assert correct >= 6  # the tiny model's word tasks, sampled at T 0.6


def test_two_concurrent_requests_fork_one_cached_prefix(server, monkeypatch):
    """Two requests sharing a long system prompt, started together, both fork the one entry an
    earlier request left (the second while the first's reply holds its fork), report the shared
    prefix as cached_tokens and answer as they do alone."""
    import qwen3_mlx.server.prefix_cache as prefix_cache

    url, state = server
    worker, cache = state.worker, state.worker.cache
    system = "You are a careful assistant who reverses lists of words. " * 24  # ~300 tokens
    warm, tasks = ["snow", "fish"], [(["moon", "river"], 1), (["apple", "lake", "star"], 2)]
    _ask(url, _messages(warm, system), seed=1, max_tokens=8)  # its entry holds the prefix

    forks: list[tuple[Any, int, bool]] = []  # (source, length, first fork's entry busy then)
    copies: list[Any] = []
    fork = prefix_cache.fork

    def spy(model, source, length):
        forks.append((source, length, bool(copies) and id(copies[0]) in cache.busy))
        copies.append(fork(model, source, length))
        return copies[-1]

    monkeypatch.setattr(prefix_cache, "fork", spy)
    batch, worker.max_batch = worker.max_batch, 0  # both wait in the queue ...
    with ThreadPoolExecutor(2) as pool:
        try:
            pending = [pool.submit(_ask, url, _messages(w, system), s, 24) for w, s in tasks]
            deadline = time.monotonic() + 10
            while worker.queued < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            queued = worker.queued
        finally:
            worker.max_batch = batch  # ... and start in one pass of the decoder thread
            worker.wake.set()
        concurrent = [future.result() for future in pending]
    monkeypatch.undo()
    assert queued == 2

    render = functools.partial(render_prompt, state.tokenizer, thinking=True, tools=None)
    warm_prompt = render(_messages(warm, system))
    shared = common_prefix_length(warm_prompt, render(_messages(tasks[0][0], system)))
    assert shared == common_prefix_length(warm_prompt, render(_messages(tasks[1][0], system)))
    assert shared > 250  # the system prompt and the template around it
    (first, first_length, _), (second, second_length, first_busy) = forks
    assert first is second and first.tokens[: len(warm_prompt)] == warm_prompt
    assert first_length == second_length == shared and first_busy
    for reply in concurrent:
        assert reply.usage.prompt_tokens_details.cached_tokens == shared
    sequential = [_texts(_ask(url, _messages(w, system), s, 24)) for w, s in tasks]
    assert [_texts(reply) for reply in concurrent] == sequential


def test_a_client_that_disconnects_leaves_the_batch(server):
    url, state = server
    headers = {"Authorization": f"Bearer {API_KEY}"}
    # The tiny model repeats "moon" until max_tokens or the repetition guard (about 64 tokens).
    body = {"prompt": "moon moon moon moon", "max_tokens": 1000, "temperature": 0, "stream": True}
    before = len(state.metrics.recent)
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/completions", json=body, headers=headers) as response:
            next(line for line in response.iter_lines() if line.startswith("data:"))
    deadline = time.monotonic() + 30
    while (len(state.metrics.recent) == before or state.worker.running) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    reply = state.metrics.recent[-1]
    assert reply["finish_reason"] == "interrupted" and reply["generated_tokens"] < 60
    assert not state.worker.decoder.rows and state.worker.running == 0


def _lookup_tool():
    from qwen_agent.tools.base import BaseTool, register_tool

    @register_tool("lookup", allow_overwrite=True)
    class Lookup(BaseTool):
        description = "Look up the secret word for a key."
        parameters = {
            "type": "object",
            "properties": {"key": {"type": "string", "enum": ["apple", "moon", "river"]}},
            "required": ["key"],
        }
        calls: list = []

        def call(self, params, **kwargs):
            Lookup.calls.append(params)
            return "castle"

    return Lookup


def _run_agent(url: str, raw: bool, extra: dict) -> list:
    from qwen_agent.agents import Assistant

    llm_cfg = {
        "model": "qwen3-tiny-chat",
        "model_server": url + "/v1",
        "api_key": API_KEY,
        "generate_cfg": {"use_raw_api": raw, "max_tokens": 120, "temperature": 0, **extra},
    }
    agent = Assistant(llm=llm_cfg, function_list=["lookup"])
    messages = [{"role": "user", "content": "What is the secret word for apple?"}]
    *_, last = agent.run(messages=messages)  # each item is the whole response so far
    return last


def test_qwen_agent_raw_api_tool_loop_reuses_the_prefix(server, monkeypatch):
    """use_raw_api: tools go to the server; each step prefills only the new suffix."""
    import qwen_agent.agents.fncall_agent as fncall_agent

    url, state = server
    monkeypatch.setattr(fncall_agent, "MAX_LLM_CALL_PER_RUN", 3)
    tool = _lookup_tool()
    tool.calls.clear()
    before = len(state.metrics.recent)
    # The tiny model does not call tools unprompted yet: a named tool_choice makes every step call.
    extra = {
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        "parallel_tool_calls": False,
    }
    responses = _run_agent(url, True, extra)
    steps = list(state.metrics.recent)[before:]
    assert len(tool.calls) >= 2 and all(
        "apple" in c or "moon" in c or "river" in c for c in tool.calls
    )
    assert any(m.get("function_call") for m in responses)
    assert len(steps) == 3
    for previous, step in zip(steps, steps[1:], strict=False):
        # Each step reuses at least the whole prompt of the step before it.
        assert step["cached_tokens"] >= previous["prompt_tokens"]
        assert (
            step["prefilled_tokens"]
            < step["prompt_tokens"] - previous["prompt_tokens"] + previous["generated_tokens"] + 2
        )


def test_qwen_agent_default_mode_completes(server):
    """Default (Nous) mode: Qwen-Agent renders its own tool prompt and sends no `tools`; the
    server leaves any <tool_call> text in the content for Qwen-Agent to parse."""
    url, state = server
    _lookup_tool()
    before = len(state.metrics.recent)
    responses = _run_agent(url, False, {})
    assert responses and responses[-1]["role"] == "assistant"
    assert responses[-1]["content"] or any(m.get("function_call") for m in responses)
    assert len(state.metrics.recent) > before


def _tiny_lookup_tool():
    """The tiny model's own lookup tool (tiny_data.TOOLS), which Qwen-Agent's Nous prompt renders
    exactly as the chat template renders `tools`."""
    from qwen_agent.tools.base import BaseTool, register_tool

    function = TOOLS["lookup"]["function"]

    @register_tool("lookup", allow_overwrite=True)
    class TinyLookup(BaseTool):
        description = function["description"]
        parameters = function["parameters"]
        calls: list = []

        def call(self, params, **kwargs):
            TinyLookup.calls.append(self._verify_json_format_args(params))
            return "castle"

    return TinyLookup


@pytest.mark.parametrize("where", ["per request", "--reasoning-field content"])
def test_qwen_agent_thought_in_content_tool_loop(server, where):
    """thought_in_content: Qwen-Agent's Nous mode reads `<think>…</think>` from the content (left
    there by reasoning_format "none" or --reasoning-field content), parses the call after it and
    sends the thought back in the content, which the template renders as the model wrote it."""
    url, state = server
    tool = _tiny_lookup_tool()
    tool.calls.clear()
    extra: dict = {"thought_in_content": True}
    field = state.reasoning_field
    if where == "per request":
        extra["extra_body"] = {"reasoning_format": "none"}
    else:
        state.reasoning_field = "content"
    before = len(state.metrics.recent)
    try:
        responses = _run_agent(url, False, extra)
    finally:
        state.reasoning_field = field
    assert tool.calls == [{"key": "apple"}]
    thought, call, result, answer = responses
    assert thought["content"].startswith("<think>\nThe user wants the secret word for apple")
    assert call["function_call"]["name"] == "lookup" and result["role"] == "function"
    assert answer["content"].startswith("<think>\n")
    assert answer["content"].endswith("</think>\n\nThe secret word for apple is castle.")
    first, second = list(state.metrics.recent)[before:]
    # The history holds the thought and the call exactly as generated: all of it is cached.
    assert second["cached_tokens"] >= first["prompt_tokens"] + first["generated_tokens"] - 1
