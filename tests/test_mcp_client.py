"""The MCP client against real servers: mcp-server-time (PyPI) and a tiny FastMCP-style server.

One manager starts every server once for the module (starting Python servers costs seconds on a
busy machine); the last test closes it and checks that no server process is left.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import pytest

from qwen3_mlx.mcp import McpManager, parse_mcp_config

FIXTURES = Path(__file__).parent / "fixtures" / "mcp"
CONFIG = {
    "mcpServers": {
        # The model card's server, with python -m in place of uvx (no network in tests).
        "time": {
            "command": sys.executable,
            "args": ["-m", "mcp_server_time", "--local-timezone=UTC"],
        },
        "tiny": {
            "command": sys.executable,
            "args": [str(FIXTURES / "tiny_server.py")],
            "timeout": 3,
        },
        "silent": {
            "command": sys.executable,
            "args": [str(FIXTURES / "silent_server.py")],
            "startup_timeout": 3,
        },
        "missing": {"command": "no-such-mcp-server-command"},
        "dies": {
            "command": sys.executable,
            "args": ["-c", r"import sys; sys.exit('bad flag --x\x1b]0;PWNED\x07')"],
        },
    }
}


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("mcp-logs")
    manager = McpManager(parse_mcp_config(CONFIG), log_dir=logs)
    manager.start()
    manager.problems = manager.wait_started()
    yield manager
    manager.close()


def tool(manager: McpManager, name: str):
    found = manager.find(name)
    assert found is not None, [t.function_name for t in manager.tools]
    return found


def test_the_time_server_lists_its_tools_with_full_schemas(manager: McpManager) -> None:
    time_tools = {t.name: t for t in manager.tools if t.server == "time"}
    assert set(time_tools) == {"get_current_time", "convert_time"}
    current = time_tools["get_current_time"]
    assert (
        current.function_name == "time-get_current_time"
        and current.label == "time.get_current_time"
    )
    assert current.input_schema["required"] == ["timezone"]
    assert "title" in current.input_schema  # kept whole, not cut to type/properties/required


def test_calling_get_current_time(manager: McpManager) -> None:
    outcome = manager.call(tool(manager, "time-get_current_time"), {"timezone": "UTC"})
    assert not outcome.is_error and '"timezone": "UTC"' in outcome.text


def test_a_tool_error_is_an_error_outcome(manager: McpManager) -> None:
    outcome = manager.call(tool(manager, "time-get_current_time"), {"timezone": "Nowhere/Land"})
    assert outcome.is_error and "Invalid timezone" in outcome.text
    assert outcome.content().startswith("Error")
    failed = manager.call(tool(manager, "tiny-fail"), {"reason": "out of cheese"})
    assert failed.is_error and "out of cheese" in failed.text


def test_text_and_image_results(manager: McpManager) -> None:
    assert manager.call(tool(manager, "tiny-echo"), {"text": "héllo"}).text == "héllo"
    picture = manager.call(tool(manager, "tiny-picture"), {})
    assert picture.text == "[image: image/png, 108 bytes, not shown to the model]"


def test_a_slow_call_times_out_and_the_server_stays_usable(manager: McpManager) -> None:
    started = time.monotonic()
    outcome = manager.call(tool(manager, "tiny-slow"), {"seconds": 30})
    assert outcome.is_error and "did not answer within 3 s" in outcome.text
    assert time.monotonic() - started < 10


def test_servers_that_fail_to_start_are_named_in_one_line_each(manager: McpManager) -> None:
    problems = "\n".join(manager.problems)
    assert len(manager.problems) == 3
    assert "'silent' not started: no answer to initialize within 3 s" in problems
    assert "'missing' not started: command 'no-such-mcp-server-command' not found" in problems
    # Its stderr line is quoted with the escapes it holds made visible, never sent to the terminal.
    assert r"'dies' not started: it exited at start: bad flag --x\x1b]0;PWNED\x07" in problems
    assert {t.server for t in manager.tools} == {"time", "tiny"}


def test_server_stderr_goes_to_the_log_file(manager: McpManager) -> None:
    log = manager.states["tiny"].log_path
    assert log.parent == manager.log_dir and "tiny server starting" in log.read_text()


def test_uvx_timeouts_say_a_first_run_can_be_slow() -> None:
    from qwen3_mlx.mcp.manager import _startup_timeout_message

    (config,) = parse_mcp_config({"mcpServers": {"t": {"command": "uvx", "args": ["x"]}}})
    assert "a first uvx run downloads the server" in _startup_timeout_message(config)


def test_close_leaves_no_server_process(manager: McpManager) -> None:
    me = psutil.Process()
    children = me.children(recursive=True)
    assert len(children) >= 2  # time and tiny (the silent one was stopped at its timeout)
    manager.close()
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert alive == []
    assert manager.call(tool(manager, "tiny-echo"), {"text": "x"}).is_error


def test_a_noisy_server_log_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen3_mlx.mcp import server_log

    monkeypatch.setattr(server_log, "LOG_CAP", 64 * 1024)
    monkeypatch.setattr(server_log, "CHECK_SECONDS", 0.05)
    noisy = (
        "import sys, time\n"
        "for _ in range(20):\n"
        "    sys.stderr.write('noise ' * 20_000 + '\\n'); sys.stderr.flush(); time.sleep(0.05)\n"
        "sys.stdin.read()\n"
    )  # 2.4 MB of stderr, and never an answer to initialize
    config = {"mcpServers": {"noisy": {"command": sys.executable, "args": ["-c", noisy]}}}
    config["mcpServers"]["noisy"]["startup_timeout"] = 1.5
    with McpManager(parse_mcp_config(config), log_dir=tmp_path) as manager:
        (problem,) = manager.wait_started()
    assert "no answer to initialize" in problem
    log = tmp_path / "mcp-noisy.log"
    older = tmp_path / "mcp-noisy.log.1"
    assert older.stat().st_size <= 64 * 1024 and log.stat().st_size < 512 * 1024
    assert "the log passed" in log.read_text()
