"""The server with agent clients: Qwen-Agent (default and raw mode) and 8 concurrent clients."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from test_server_support import API_KEY, running_server

WORDS = ["moon", "river", "apple", "lake", "star", "tree", "fish", "snow"]


@pytest.fixture(scope="module")
def server():
    with running_server(max_concurrency=16) as (url, state):
        yield url, state


def _reverse(url: str, words: list[str], seed: int) -> tuple[str, str]:
    client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Reverse these words: " + " ".join(words)}],
        temperature=0 if seed % 2 else 0.6,  # greedy and seeded sampling share the batch
        seed=seed,
        max_tokens=64,
    )
    message = reply.choices[0].message
    return message.content, message.model_extra.get("reasoning_content", "")


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
