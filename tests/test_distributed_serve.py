"""`qwen3-mlx serve` under `mlx.launch -n 2 --backend ring` over loopback, through the openai SDK.

One group serves the whole module (the tiny trained model): rank 0 owns the HTTP socket, rank 1
mirrors every forward pass and cache operation of the batch decoder and the prefix cache. Its
answers are compared with the single-process server's (in this process). The last test of the
group stops it with SIGINT to rank 0 and checks that every rank ends, in step (rank 0 sends STOP,
both exit 0), with no process left over.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from distributed_ranks import TINY_CHAT
from test_distributed import TIMEOUT, start_group
from test_server_openai import LOOKUP, NO_THINK, REVERSE, WORD_COUNT
from test_server_support import API_KEY, free_port, running_server

from qwen3_mlx.server.runner import stop_signals_caught

QUESTIONS = [
    "Reverse these words: apple moon",
    "Sort these words: river apple moon",
    "What is the capital of France?",
    "Reverse these words: moon river",
]
STARTED = re.compile(r"Started server process \[(\d+)\]")


def wait_until_serving(url: str, launcher: subprocess.Popen, log: Path) -> None:
    """Return once rank 0 answers /health; fail if the launcher ends or TIMEOUT passes."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            pytest.fail(f"the group ended before serving: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the group did not start serving: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """(base URL, launcher process, its log) of a 2-rank server, killed at the end if still up."""
    log = tmp_path_factory.mktemp("serve") / "launch.log"
    port = free_port()
    command = ["serve", "--model", str(TINY_CHAT), "--port", str(port), "--api-key", API_KEY]
    with log.open("w") as output:
        launcher = start_group([*command, "--context-length", "512"], output, output)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, launcher, log)
        yield url, launcher, log
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


@pytest.fixture(scope="module")
def client(group: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=group[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def single(group: Any) -> Any:
    """An openai client of the single-process server (in this process, same model)."""
    with running_server(context_length=512) as (url, _):
        yield openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)


def ask(client: openai.OpenAI, question: str, **options: Any) -> Any:
    """A greedy, thinking-off chat completion of one user message."""
    messages = [{"role": "user", "content": question}]
    options.setdefault("max_tokens", 48)
    return client.chat.completions.create(
        model="m", messages=messages, temperature=0, extra_body=NO_THINK, **options
    )


def test_greedy_chat_equals_the_single_process_server(client, single) -> None:
    ours = client.chat.completions.create(model="m", messages=REVERSE, temperature=0, max_tokens=64)
    theirs = single.chat.completions.create(
        model="m", messages=REVERSE, temperature=0, max_tokens=64
    )
    assert ours.choices[0].message.content == "river moon"
    assert ours.choices[0].message.model_dump() == theirs.choices[0].message.model_dump()
    assert ours.usage.completion_tokens == theirs.usage.completion_tokens
    again = client.chat.completions.create(
        model="m", messages=REVERSE, temperature=0, max_tokens=64
    )
    assert again.choices[0].message.content == "river moon"
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the entry, reused in place
    other = [{"role": "user", "content": "Reverse these words: apple river"}]
    forked = client.chat.completions.create(model="m", messages=other, temperature=0, max_tokens=64)
    alone = single.chat.completions.create(model="m", messages=other, temperature=0, max_tokens=64)
    assert forked.usage.prompt_tokens_details.cached_tokens > 0  # a fork of the shared prefix
    assert forked.choices[0].message.content == alone.choices[0].message.content


def test_streamed_answer_equals_the_whole_one(client) -> None:
    whole = ask(client, QUESTIONS[0]).choices[0].message.content
    stream = ask(client, QUESTIONS[0], stream=True)
    assert (
        "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == whole
    )


def test_tool_call_works(client) -> None:
    # (Compared with test_server_openai's answer, not a second server's: building the tool
    # grammar twice on 2 shared cores, next to a spinning follower, costs tens of seconds.)
    reply = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "What is the secret word for apple?"}],
        tools=[LOOKUP, WORD_COUNT],
        temperature=0,
        max_tokens=64,
        extra_body=NO_THINK,
    )
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, json.loads(call.function.arguments)) == ("lookup", {"key": "apple"})


def test_concurrent_requests_are_batched_and_equal_single_runs(client, single) -> None:
    expected = [ask(single, question).choices[0].message.content for question in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS) * 2) as pool:
        answers = list(pool.map(lambda q: ask(client, q).choices[0].message.content, QUESTIONS * 2))
    assert answers == expected * 2  # 8 rows merged into and extracted from one batch


def test_disconnects_and_bad_requests_leave_the_ranks_in_step(client, group) -> None:
    stream = ask(client, QUESTIONS[1], stream=True, max_tokens=400)
    next(iter(stream))
    stream.close()  # the client goes away mid-reply: its row leaves the batch on every rank
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    bad = httpx.post(group[0] + "/v1/chat/completions", content=b"{not json", headers=headers)
    assert bad.status_code in (400, 422)
    with pytest.raises(openai.BadRequestError) as overflow:
        ask(client, "moon " * 600)
    assert overflow.value.code == "context_length_exceeded"
    assert ask(client, QUESTIONS[3]).choices[0].message.content == "river moon"


def test_sigint_to_rank_0_stops_every_rank(group) -> None:
    url, launcher, log = group
    ranks = psutil.Process(launcher.pid).children(recursive=True)
    assert len(ranks) >= 2
    rank0 = int(STARTED.search(log.read_text()).group(1))
    os.kill(rank0, signal.SIGINT)
    try:
        launcher.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the ranks did not stop: {log.read_text()[-3000:]}")
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert alive == []
    text = log.read_text()
    assert "exited with code" not in text and "was killed" not in text, text[-3000:]
    assert "Finished server process" in text


def test_sigterm_ends_a_server_as_sigint_does() -> None:
    # uvicorn shuts down on either, then raises the signal again: SIGTERM's default would end
    # rank 0 before it stops the other ranks.
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals_caught():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this at once
        pytest.fail("SIGTERM did not end the block")
    assert signal.getsignal(signal.SIGTERM) is before
