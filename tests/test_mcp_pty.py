"""`chat` and `prompt` with MCP servers in a real pseudo-terminal: the header announces the tools,
/tools lists them, a server that fails is named in one line; the trained tiny model calls a real
server's tool with consent and answers from it; Ctrl-C, Ctrl-D and a crashed server leave no
server process behind."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pexpect
import psutil
from test_repl_pty import (  # noqa: F401
    START_TIMEOUT,
    TRAINED,
    babbling_model,
    command,
    default_sigint,
    quit_with_ctrl_d,
    spawn_chat,
    spawn_cli,
    wait_for_prompt,
)

from qwen3_mlx.mcp.naming import function_name

TIME = {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone=UTC"]}


def test_header_tools_command_and_no_orphans_after_ctrl_d(
    tmp_path: Path,
    babbling_model: Path,  # noqa: F811
) -> None:
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"time": TIME, "gone": {"command": "no-such-x"}}}))
    child = spawn_chat(tmp_path, "-m", str(babbling_model), "--mcp-config", str(config))
    child.logfile_read.flush()
    header = (tmp_path / "pty.log").read_text(encoding="utf-8")
    assert "MCP server 'gone' not started: command 'no-such-x' not found" in header
    assert "tools: 2 tools from time · /tools lists them" in header
    servers = psutil.Process(child.pid).children(recursive=True)
    assert servers, "the time server runs as a child of chat"
    out = command(child, "/tools")
    assert "time.get_current_time" in out and "time.convert_time" in out
    assert quit_with_ctrl_d(child) == 0
    _, alive = psutil.wait_procs(servers, timeout=10)
    assert alive == []
    log = tmp_path / "home" / ".local" / "state" / "qwen3-mlx" / "mcp-time.log"
    assert log.is_file()


SECRET_SERVER = Path(__file__).parent / "fixtures" / "mcp" / "secret_server.py"
LOOKUP_QUESTION = 'secret.lookup({"key": "moon"}) [y]es / [n]o / [a]lways for this tool?'


def secret_config(tmp_path: Path) -> Path:
    """The lookup server as `secret`: the model sees `secret-lookup` and calls `lookup`, which
    the manager accepts because only one server has a tool of that name."""
    config = tmp_path / "mcp.json"
    server = {
        "command": sys.executable,
        "args": [str(SECRET_SERVER)],
        "env": {"SECRET_SLOW_CALL": "2"},  # the second call hangs until Ctrl-C cancels it
    }
    config.write_text(json.dumps({"mcpServers": {"secret": server}}))
    return config


def test_the_trained_model_calls_a_real_server_with_consent_and_survives_its_crash(
    tmp_path: Path,
) -> None:
    config = secret_config(tmp_path)
    child = spawn_chat(
        tmp_path, "-m", str(TRAINED), "--mcp-config", str(config), "--seed", "0", "--temp", "0"
    )
    (server,) = psutil.Process(child.pid).children(recursive=True)
    child.sendline("What is the secret word for moon?")
    child.expect_exact(LOOKUP_QUESTION)
    child.sendline("y")
    out = wait_for_prompt(child)
    assert "← secret.lookup: river" in out
    assert "The secret word for moon is river." in out
    # A slow call: Ctrl-C while it runs cancels the call, not the conversation or the server.
    child.sendline("What is the secret word for moon?")
    child.expect_exact(LOOKUP_QUESTION)
    child.sendline("y")
    child.expect_exact("secret.lookup")  # the spinner of the running call
    time.sleep(1)
    child.sendintr()
    out = wait_for_prompt(child)
    assert "← secret.lookup: cancelled" in out and "Traceback" not in out
    assert child.isalive() and server.is_running()
    # Ctrl-C at the consent question answers no; the model is told and the chat goes on.
    child.sendline("What is the secret word for moon?")
    child.expect_exact(LOOKUP_QUESTION)
    child.sendintr()
    assert "← secret.lookup: declined" in wait_for_prompt(child)
    assert server.is_running(), "Ctrl-C at the terminal never reaches the server"
    # The server crashes: the next call says so in one line, and the chat goes on.
    server.kill()
    server.wait(10)
    child.sendline("What is the secret word for moon?")
    child.expect_exact(LOOKUP_QUESTION)
    child.sendline("y")
    out = wait_for_prompt(child)
    assert "✗ secret.lookup: the MCP server 'secret' stopped during the session" in out
    assert child.isalive() and "Traceback" not in out
    assert quit_with_ctrl_d(child) == 0
    assert not psutil.pid_exists(server.pid)


def spawn_prompt(tmp_path: Path, *args: str) -> pexpect.spawn:
    return spawn_cli(tmp_path, "prompt", *args, log_name="prompt.log", timeout=START_TIMEOUT)


def test_prompt_asks_on_the_terminal_and_ctrl_c_leaves_no_server(tmp_path: Path) -> None:
    config = secret_config(tmp_path)
    flags = ("-m", str(TRAINED), "--mcp-config", str(config), "--temp", "0", "--seed", "0")
    # Two runs side by side (start-up is most of their time): one answers y, one gets Ctrl-C.
    child = spawn_prompt(tmp_path, "What is the secret word for moon?", *flags)
    second = spawn_prompt(tmp_path, "What is the secret word for moon?", *flags)
    child.expect_exact(LOOKUP_QUESTION)
    child.sendline("y")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert "← secret.lookup: river" in child.before
    assert "The secret word for moon is river." in child.before
    # Ctrl-C at the question ends prompt (130) and stops the server.
    child = second
    child.expect_exact(LOOKUP_QUESTION)
    servers = psutil.Process(child.pid).children(recursive=True)
    assert servers
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    _, alive = psutil.wait_procs(servers, timeout=10)
    assert alive == []


HOSTILE_SERVER = Path(__file__).parent / "fixtures" / "mcp" / "hostile_server.py"
SCRIPTED_CLI = (str(Path(__file__).parent / "scripted_cli.py"),)
EVIL = "lookup\x1b]0;PWNED\x07\x1b[2K\rsecret.lookup"
EVIL_SHOWN = r"hostile.lookup\x1b]0;PWNED\x07\x1b[2K\rsecret.lookup"


def test_a_tool_server_cannot_drive_the_terminal(tmp_path: Path) -> None:
    """Names, descriptions and results a server sends are shown with their escapes visible: the
    consent line names the tool really asked about, and no result types into our input."""
    config = tmp_path / "mcp.json"
    server = {"command": sys.executable, "args": [str(HOSTILE_SERVER)]}
    config.write_text(json.dumps({"mcpServers": {"hostile": server}}))
    flags = ("-m", "scripted", "--mcp-config", str(config))
    # prompt starts beside chat (start-up is most of the time); it asks on stderr, and shows the
    # step there, with the same escapes.
    call = f'call {function_name("hostile", EVIL)} {{"key": "moon"}}'
    prompt = spawn_cli(tmp_path, "prompt", call, *flags, log_name="pty.log", launcher=SCRIPTED_CLI)
    child = spawn_cli(
        tmp_path, "chat", *flags, log_name="pty.log", timeout=START_TIMEOUT, launcher=SCRIPTED_CLI
    )
    wait_for_prompt(child, timeout=START_TIMEOUT)
    out = command(child, "/tools")
    assert EVIL_SHOWN in out and r"Fetch a page\x1b]0;PWNED\x07" in out
    child.sendline(call)
    child.expect_exact(EVIL_SHOWN + '({"key": "moon"}) [y]es / [n]o / [a]lways for this tool?')
    child.sendline("n")
    assert f"← {EVIL_SHOWN}: declined" in wait_for_prompt(child)
    child.sendline('call hostile-fetch {"url": "a"}')
    child.expect_exact('hostile.fetch({"url": "a"}) [y]es')
    child.sendline("y")
    assert r"← hostile.fetch: page \x1b[6n text \x9b6n end" in wait_for_prompt(child)
    assert quit_with_ctrl_d(child) == 0
    prompt.expect_exact(EVIL_SHOWN + '({"key": "moon"}) [y]es', timeout=START_TIMEOUT)
    prompt.sendline("y")
    prompt.expect(pexpect.EOF)
    prompt.close()
    assert prompt.exitstatus == 0 and f"← {EVIL_SHOWN}: river" in prompt.before
    raw = (tmp_path / "pty.log").read_text(encoding="utf-8")
    assert "PWNED" in raw  # shown ...
    for sequence in ("\x1b]0;PWNED", "\x07", "\x1b[6n", "\x9b", "\x1b[8m"):
        assert sequence not in raw  # ... never sent to the terminal as it came
