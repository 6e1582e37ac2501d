"""What a client cannot make `qwen3-mlx serve` do, against the real command on loopback.

One server for the module: `qwen3-mlx serve` in a process of its own (the tiny model, a 4,096-token
context, a 1 s request deadline, a 4 s drain, no shared prompt cache), so its uvicorn settings,
signals and exit status are the real ones. The last test stops it with SIGTERM.
(The stop in a loop, after MLX work, is test_server_batching's worker exit test: cheaper than
three servers.)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_server_support import API_KEY, TINY_MODEL, free_port

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
START_SECONDS = 120
DRAIN_SECONDS = 4
USER = [{"role": "user", "content": "Reverse these words: moon river"}]


def start_server(port: int, *options: str) -> subprocess.Popen:
    """`qwen3-mlx serve` of the tiny model on a loopback port, its output in a pipe."""
    command = [sys.executable, "-m", "qwen3_mlx", "serve", "--model", str(TINY_MODEL)]
    return subprocess.Popen(
        [*command, "--port", str(port), "--api-key", API_KEY, *options],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_until_serving(url: str, process: subprocess.Popen) -> None:
    """Return once /health answers; fail if the process ends first or START_SECONDS pass."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server ended before serving: {process.stdout.read()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    pytest.fail("the server did not start serving")


def stop(process: subprocess.Popen, signum: int) -> tuple[int, str, float]:
    """(exit status, output, seconds it took) after sending `signum`."""
    started = time.monotonic()
    process.send_signal(signum)
    try:
        output, _ = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"the server did not stop: {output[-3000:]}")
    return process.returncode, output, time.monotonic() - started


@pytest.fixture(scope="module")
def server() -> Any:
    """(base URL, process) of the module's server; killed at the end if still running."""
    port = free_port()
    process = start_server(
        port,
        "--context-length", "4096",
        "--request-timeout", "1",
        "--shutdown-timeout", str(DRAIN_SECONDS),
        "--no-shared-prompt-cache",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def post(url: str, path: str, body: Any, **options: Any) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=HEADERS, timeout=60, **options)


def test_text_beyond_the_context_is_refused_by_its_size(server):
    url, _ = server
    big = "moon " * 120_000  # 600 kB: at least 4,687 tokens (bytes / 128), over the 4,096 context
    refusals = [
        (post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": big}]}), "messages"),
        (post(url, "/tokenize", {"messages": [{"role": "user", "content": big}]}), "messages"),
        (post(url, "/tokenize", {"prompt": big}), "prompt"),
    ]  # fmt: skip
    tool = {"type": "function", "function": {"name": "t", "description": big}}
    tools = post(url, "/v1/chat/completions", {"messages": USER, "tools": [tool]})
    for response, param in [*refusals, (tools, "tools")]:
        error = response.json()["error"]
        assert response.status_code == 400, error
        assert (error["code"], error["param"]) == ("context_length_exceeded", param)
        assert "at least" in error["message"], error  # counted from bytes, never tokenized


def test_a_chunked_body_is_counted_as_it_arrives(server):
    url, _ = server

    def body() -> Any:  # no Content-Length: sent chunked
        for _ in range(65):
            yield b" " * (1 << 20)

    response = httpx.post(url + "/v1/chat/completions", content=body(), headers=HEADERS, timeout=60)
    assert response.status_code == 413, response.text
    assert "67,108,864-byte limit" in response.json()["error"]["message"]
    assert httpx.get(url + "/health").status_code == 200


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # a connection that never sends
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # half the head
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b"\r\n\r\n{",  # half the body
    ],
    ids=["nothing", "half the head", "half the body"],
)
def test_half_sent_requests_are_closed_at_the_deadline(server, sent):
    url, _ = server
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as connection:
        connection.sendall(sent)
        connection.settimeout(15)
        started = time.monotonic()
        assert connection.recv(1024) == b""  # closed by the server (1 s deadline)
        assert time.monotonic() - started < 10


def test_metrics_label_by_route_template(server):
    url, _ = server
    for number in range(5):
        httpx.get(f"{url}/probe-{number}/x", headers=HEADERS)
        httpx.get(f"{url}/v1/probe-{number}")  # unauthenticated too
    # A route of an included router (the Anthropic API's), answered and refused.
    count = {"model": "qwen3", "messages": [{"role": "user", "content": "moon"}]}
    assert httpx.post(f"{url}/v1/messages/count_tokens", json=count, headers=HEADERS).is_success
    assert httpx.post(f"{url}/v1/messages/count_tokens", json=count).status_code == 401
    metrics = httpx.get(url + "/metrics", headers=HEADERS).text
    assert 'endpoint="/v1/messages/count_tokens",status="200"' in metrics
    assert 'endpoint="/v1/messages/count_tokens",status="401"' in metrics
    assert "probe" not in metrics
    assert 'endpoint="unmatched",status="404"' in metrics
    assert 'endpoint="unmatched",status="401"' in metrics
    assert 'endpoint="/health",status="200"' in metrics


def test_only_loopback_host_names_are_answered(server):
    url, _ = server
    port = url.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", "10.0.0.1"):
        refused = httpx.get(url + "/v1/models", headers={**HEADERS, "Host": host})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_host"
    for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}"):
        assert httpx.get(url + "/v1/models", headers={**HEADERS, "Host": host}).status_code == 200


def test_client_mistakes_are_400_with_the_field(server):
    url, _ = server
    bad_json = httpx.post(
        url + "/v1/chat/completions",
        content=b'{"messages": [1, 2,,]}',
        headers={**HEADERS, "Content-Type": "application/json"},
    )
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["param"] is None  # not a character offset
    assert "not valid JSON" in bad_json.json()["error"]["message"]
    orphan = [*USER, {"role": "tool", "tool_call_id": "call_1", "content": "castle"}]
    answered = post(url, "/v1/chat/completions", {"messages": orphan, "max_tokens": 2})
    assert answered.status_code == 400 and answered.json()["error"]["param"] == "messages"
    for field, value in (("logprobs", 2), ("logprobs", 0), ("echo", True)):
        refused = post(url, "/v1/completions", {"prompt": "moon", "max_tokens": 2, field: value})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == field
    odd_key = httpx.get(
        url + "/v1/models", headers={"Authorization": "Bearer k\xe9y".encode("latin-1")}
    )
    assert odd_key.status_code == 401


def test_without_a_shared_prompt_cache_nothing_is_reused(server):
    url, _ = server
    body = {"messages": USER, "max_tokens": 2, "temperature": 0}
    for _ in range(2):
        usage = post(url, "/v1/chat/completions", body).json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_a_taken_port_is_one_error_line_before_the_model_loads(server):
    url, _ = server
    port = url.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "qwen3_mlx", "serve", "--model", str(TINY_MODEL)]
    taken = subprocess.run(
        [*command, "--host", "0.0.0.0", "--port", port],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=START_SECONDS,
    )
    assert taken.returncode == 1, taken.stderr
    lines = taken.stderr.splitlines()
    assert lines[0].startswith("Warning: serving on 0.0.0.0 without --api-key"), lines
    assert lines[1:] == [
        f"Error: port {port} on 0.0.0.0 is already in use (another server?); choose another "
        "with --port"
    ]


def read_stream(url: str, max_tokens: int, started: threading.Event, events: list[str]) -> None:
    """A streamed completion's data lines, into `events` (`started` set at the first)."""
    body = {
        "prompt": "Once upon a time",
        "temperature": 2,
        "seed": 1,
        "max_tokens": max_tokens,
        "stream": True,
    }
    with httpx.stream("POST", url + "/v1/completions", json=body, headers=HEADERS, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                started.set()


def test_sigterm_lets_replies_end_then_bounds_the_rest(server):
    url, process = server
    # The long one asks for 4,000 tokens: far more than the tiny model decodes within the drain
    # bound even on a quiet machine (about 150 tok/s), so the bound is what ends it.
    streams = {"short": (12, []), "long": (4000, [])}
    threads = []
    for tokens, events in streams.values():
        started = threading.Event()
        threads.append(threading.Thread(target=read_stream, args=(url, tokens, started, events)))
        threads[-1].start()
        assert started.wait(60)
    status, output, seconds = stop(process, signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    short, long = streams["short"][1], streams["long"][1]
    assert short[-1] == "[DONE]" and json.loads(short[-2])["choices"][0]["finish_reason"]
    last = json.loads(long[-1])
    assert last["error"]["code"] == "server_shutting_down", long[-3:]
    assert len(long) < 4000  # cut at the bound, not run to its end
    assert status == 0, output[-3000:]
    assert seconds < DRAIN_SECONDS + 20
    assert "terminate called" not in output and "Traceback" not in output
