"""SIGTERM or SIGHUP to `chat` or `prompt` stops the MCP servers and their children, as leaving
does (issue 27, Medium 12): real signals to real processes, with a scripted model (no weights)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

TESTS = Path(__file__).parent
SECRET_SERVER = TESTS / "fixtures" / "mcp" / "secret_server.py"
DEADLINE = 120  # start-up on a loaded machine


def start(tmp_path: Path, *args: str, slow: bool) -> tuple[subprocess.Popen, Path]:
    """The CLI with the secret server; returns the process and the server's log file."""
    server = {"command": sys.executable, "args": [str(SECRET_SERVER)]}
    if slow:
        server["env"] = {"SECRET_SLOW_CALL": "1", "SECRET_SLOW_CHILD": "1"}
    tmp_path.mkdir()
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"secret": server}}))
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), HOME=str(tmp_path))
    command = [sys.executable, str(TESTS / "scripted_cli.py"), *args]
    command += ["-m", "scripted", "--mcp-config", str(config)]
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    return process, tmp_path / "state" / "qwen3-mlx" / "mcp-secret.log"


def wait_for(log: Path, text: str, process: subprocess.Popen) -> None:
    """Until the server's log holds text (the server writes it there on stderr)."""
    deadline = time.monotonic() + DEADLINE
    while text not in (log.read_text() if log.exists() else ""):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, f"no {text!r} in {log}"
        time.sleep(0.1)


def stop(process: subprocess.Popen, number: int) -> int:
    """Send the signal once the servers run; the exit status, after every descendant is gone."""
    descendants = psutil.Process(process.pid).children(recursive=True)
    assert descendants
    process.send_signal(number)
    status = process.wait(30)
    _, alive = psutil.wait_procs(descendants, timeout=15)
    assert alive == [], [proc.cmdline() for proc in alive]
    return status


def test_sigterm_to_chat_and_sighup_to_prompt_in_a_call_stop_the_servers(tmp_path: Path) -> None:
    # Both start at once (start-up is most of the time): chat waiting for input, and prompt in
    # the middle of a call whose tool has started a process of its own.
    chat, chat_log = start(tmp_path / "chat", "chat", slow=False)
    call = 'call secret-lookup {"key": "moon"}'
    prompt, prompt_log = start(tmp_path / "prompt", "prompt", "--yes", call, slow=True)
    wait_for(chat_log, "secret server starting", chat)
    assert stop(chat, signal.SIGTERM) == 128 + signal.SIGTERM
    wait_for(prompt_log, "slow call started", prompt)
    assert stop(prompt, signal.SIGHUP) == 128 + signal.SIGHUP
