"""The ranks of a group end together, with no reply cut and no process left
(qwen3_mlx/parallel/group_end.py).

Each test starts its own 2-rank `serve` group of the tiny trained model under
`mlx.launch -n 2 --backend ring` and stops it as users and service managers do. Before: `kill
<launcher>` left both ranks running (mlx.launch exits at SIGTERM without passing it on), and a
SIGTERM to the whole group killed the follower at once, so the reply in flight failed at the drain
bound and rank 0 hung in a collective for its watchdog's 120 s.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from distributed_ranks import TINY_CHAT
from test_distributed import start_group
from test_distributed_serve import wait_until_serving
from test_server_limits import read_stream
from test_server_support import API_KEY, free_port

ENDED_WITHIN = 30  # seconds for every rank to end once its launcher is gone


def start_server(log: Path, extra_env: dict[str, str] | None = None) -> tuple[str, Any, list[Any]]:
    """(URL, launcher, the two ranks) of a serving 2-rank group."""
    port = free_port()
    command = ["serve", "--model", str(TINY_CHAT), "--port", str(port), "--api-key", API_KEY]
    with log.open("w") as output:
        launcher = start_group([*command, "--context-length", "512"], output, output, extra_env)
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, launcher, log)
    ranks = [
        child
        for child in psutil.Process(launcher.pid).children(recursive=True)
        if "MLX_RANK" in child.environ()
    ]
    assert sorted(rank.environ()["MLX_RANK"] for rank in ranks) == ["0", "1"]
    return url, launcher, ranks


def rank(ranks: list[Any], number: int) -> Any:
    return next(each for each in ranks if each.environ()["MLX_RANK"] == str(number))


def end_all(launcher: Any, ranks: list[Any]) -> None:
    """Whatever is left of a group, killed (a failed test leaves nothing running)."""
    for each in ranks:
        if each.is_running():
            each.kill()
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def reply_in_flight(url: str) -> tuple[threading.Thread, list[str]]:
    """A streamed reply of 100 tokens, running (its first token arrived)."""
    started, events = threading.Event(), []
    reader = threading.Thread(target=read_stream, args=(url, 100, started, events))
    reader.start()
    assert started.wait(60)
    return reader, events


def assert_ran_to_its_end(reader: threading.Thread, events: list[str]) -> None:
    reader.join(60)
    assert events[-1] == "[DONE]", events[-3:]
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


def test_sigterm_to_the_launcher_alone_stops_the_group_after_its_reply(tmp_path):
    url, launcher, ranks = start_server(tmp_path / "launch.log")
    try:
        reader, events = reply_in_flight(url)
        launcher.send_signal(signal.SIGTERM)  # the launcher alone, as `kill <pid>` does
        launcher.wait(10)
        assert_ran_to_its_end(reader, events)  # on both ranks, with no launcher
        gone, alive = psutil.wait_procs(ranks, timeout=ENDED_WITHIN)
        assert alive == []
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
    finally:
        end_all(launcher, ranks)


def test_sigterm_to_the_whole_group_lets_the_reply_end_then_every_rank(tmp_path):
    url, launcher, ranks = start_server(tmp_path / "launch.log")
    try:
        reader, events = reply_in_flight(url)
        began = time.monotonic()
        os.killpg(launcher.pid, signal.SIGTERM)  # as systemd or a container stop does
        assert_ran_to_its_end(reader, events)
        gone, alive = psutil.wait_procs(ranks, timeout=ENDED_WITHIN)
        assert alive == []
        assert time.monotonic() - began < ENDED_WITHIN
    finally:
        end_all(launcher, ranks)


def test_a_follower_left_without_launcher_and_leader_ends_after_the_rank_timeout(tmp_path):
    url, launcher, ranks = start_server(tmp_path / "launch.log", {"QWEN3_MLX_RANK_TIMEOUT": "3"})
    leader, follower = rank(ranks, 0), rank(ranks, 1)
    try:
        leader.suspend()  # a rank 0 that can never send the stop
        began = time.monotonic()
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        gone, alive = psutil.wait_procs([follower], timeout=ENDED_WITHIN)
        assert alive == []
        assert time.monotonic() - began >= 3  # it waited for rank 0's stop first
    finally:
        end_all(launcher, ranks)
