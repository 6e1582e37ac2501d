"""A follower of a 2-rank `qwen3-mlx serve` dies mid-reply: rank 0 must not wait for it forever.

A real `mlx.launch -n 2 --backend ring` group (the tiny model); rank 1 is killed (SIGKILL) while
a streamed reply runs. The watchdog bounds the decoding step's wait for the other rank
(QWEN3_MLX_RANK_TIMEOUT, 5 s here): the reply ends with an error event, rank 0 prints the one
line docs/distributed.md promises and exits, and the launcher ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading

import httpx
import psutil
import pytest
from distributed_ranks import TINY_CHAT
from test_distributed import start_group
from test_distributed_serve import wait_until_serving
from test_server_support import API_KEY, free_port

LOST = "lost the connection to another rank"


def stream_events(url: str, events: list[str], started: threading.Event) -> None:
    """A long streamed completion's data lines (or the exception that ended it)."""
    body = {"prompt": "Once upon a time", "temperature": 2, "seed": 1, "max_tokens": 400}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        with httpx.stream(
            "POST", url + "/v1/completions", json={**body, "stream": True}, headers=headers,
            timeout=120,
        ) as response:  # fmt: skip
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    started.set()
    except httpx.HTTPError as error:
        events.append(f"closed: {error!r}")
    finally:
        started.set()


def follower(launcher: subprocess.Popen) -> psutil.Process:
    """The rank 1 process of the group."""
    for process in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if process.environ().get("MLX_RANK") == "1" and "serve" in process.cmdline():
                return process
        except psutil.Error:
            continue
    pytest.fail("no rank 1 process")


def test_a_follower_dying_mid_reply_ends_rank_0_with_one_line(tmp_path):
    log = tmp_path / "launch.log"
    port = free_port()
    command = ["serve", "--model", str(TINY_CHAT), "--port", str(port), "--api-key", API_KEY]
    with log.open("w") as output:
        launcher = start_group(
            [*command, "--context-length", "512"], output, output, {"QWEN3_MLX_RANK_TIMEOUT": "5"}
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, launcher, log)
        events: list[str] = []
        started = threading.Event()
        reader = threading.Thread(target=stream_events, args=(url, events, started))
        reader.start()
        assert started.wait(60)
        follower(launcher).kill()
        try:
            launcher.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 hung after its follower died: {log.read_text()[-2000:]}")
        reader.join(30)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert LOST in json.loads(events[-1])["error"]["message"], events[-3:]
    lines = [line for line in log.read_text().splitlines() if line.startswith("Error:")]
    assert lines == [
        f"Error: {LOST} (a decoding step waited more than 5 s for the other ranks; set "
        "QWEN3_MLX_RANK_TIMEOUT to wait longer)"
    ]
