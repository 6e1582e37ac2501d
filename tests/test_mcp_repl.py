"""Tool calls with consent: the REPL (pipe reader) and `prompt`, over a scripted model and the real
mcp-server-time. No call runs without a yes, an `always`, --yes or an allow-list entry."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from chat_fakes import ScriptedModel, load_fixture_tokenizer
from rich.console import Console
from typer.testing import CliRunner

from qwen3_mlx.chat import Chat
from qwen3_mlx.cli.app import app
from qwen3_mlx.cli.line_input import pipe_reader
from qwen3_mlx.cli.repl import Repl
from qwen3_mlx.cli.tool_steps import DECLINED, ToolSession
from qwen3_mlx.generation_config import GenerationConfig
from qwen3_mlx.mcp import Consent, McpManager, parse_mcp_config

TIME = {"command": sys.executable, "args": ["-m", "mcp_server_time", "--local-timezone=UTC"]}
CALL = (
    '<tool_call>\n{"name": "time-get_current_time", "arguments": {"timezone": "UTC"}}\n</tool_call>'
)
QUESTION = 'time.get_current_time({"timezone": "UTC"}) [y]es / [n]o / [a]lways for this tool?'
pytestmark = pytest.mark.filterwarnings("ignore::qwen3_mlx.settings.GreedyThinkingWarning")


def agent(user: str) -> str:
    """Call the time tool for a question; answer once a tool response (or a refusal) is back."""
    if user.startswith("<tool_response>"):
        if "declined" in user:
            return "<think>\nNo tool.\n</think>\n\nI may not check the time.<|im_end|>"
        return "<think>\nGot it.\n</think>\n\nIt is daytime in UTC.<|im_end|>"
    return f"<think>\nI need the clock.\n</think>\n\n{CALL}<|im_end|>"


def endless(user: str) -> str:
    return f"<think>\nAgain.\n</think>\n\n{CALL}<|im_end|>"


def make_chat(script=agent) -> Chat:
    tokenizer = load_fixture_tokenizer("qwen3-4b")
    return Chat(
        ScriptedModel(tokenizer, script), tokenizer, GenerationConfig(), sampling={"temperature": 0}
    )


@pytest.fixture(scope="module")
def manager(tmp_path_factory: pytest.TempPathFactory):
    with McpManager(
        parse_mcp_config({"mcpServers": {"time": TIME}}), log_dir=tmp_path_factory.mktemp("logs")
    ) as manager:
        assert manager.wait_started() == []
        yield manager


def run_repl(manager: McpManager, lines: str, script=agent, max_steps: int = 8, **consent):
    chat = make_chat(script)
    session = ToolSession(manager, Consent(**consent), max_steps)
    session.switch(chat, True)
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=200)
    Repl(chat, console, pipe_reader(io.StringIO(lines)), tools=session).run()
    return chat, out.getvalue()


def tool_messages(chat: Chat) -> list[str]:
    return [m["content"] for m in chat.messages if m["role"] == "tool"]


def test_yes_runs_the_call_and_the_model_answers(manager: McpManager) -> None:
    chat, out = run_repl(manager, "what time is it?\ny\n")
    assert QUESTION in out
    assert "← time.get_current_time:" in out and "It is daytime in UTC." in out
    (result,) = tool_messages(chat)
    assert '"timezone": "UTC"' in result


def test_no_declines_and_the_model_is_told(manager: McpManager) -> None:
    chat, out = run_repl(manager, "what time is it?\nn\n")
    assert QUESTION in out and "declined" in out
    assert tool_messages(chat) == [DECLINED]
    assert "I may not check the time." in out


def test_always_asks_once_per_tool(manager: McpManager) -> None:
    chat, out = run_repl(manager, "what time?\na\nand now?\n")
    assert out.count(QUESTION) == 1
    assert len(tool_messages(chat)) == 2 and DECLINED not in tool_messages(chat)


def test_end_of_input_at_the_question_declines(manager: McpManager) -> None:
    chat, _ = run_repl(manager, "what time?\n")
    assert tool_messages(chat) == [DECLINED]


def test_the_allow_list_and_yes_skip_the_question(manager: McpManager) -> None:
    chat, out = run_repl(manager, "what time?\n", allow=["time.*"])
    assert QUESTION not in out and "DECLINED" not in out and len(tool_messages(chat)) == 1
    chat, out = run_repl(manager, "what time?\n", yes=True)
    assert QUESTION not in out and '"timezone": "UTC"' in tool_messages(chat)[0]


def test_the_loop_stops_at_the_step_limit(manager: McpManager) -> None:
    chat, out = run_repl(manager, "loop\n", script=endless, max_steps=2, yes=True)
    assert len(tool_messages(chat)) == 2
    assert "stopped after 2 tool steps (--max-tool-steps 2)" in out


def test_tools_command_lists_and_switches(manager: McpManager) -> None:
    chat, out = run_repl(manager, "/tools\n/tools off\nwhat time?\n/tools on\n")
    assert "2 tools from time" in out and "time.get_current_time" in out
    assert "tools on: 2 tools from time" in out and len(chat.tools) == 2
    assert "Get current time in a specific timezone" in out
    # Off, the model is given no tools: what it writes is not parsed as a call, and nothing runs.
    assert "tools off: 2 tools from time (off)" in out and QUESTION not in out
    assert tool_messages(chat) == []


def run_prompt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str):
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"time": TIME}}))
    for name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setattr("qwen3_mlx.cli.options.SessionSpec.open_chat", lambda spec: make_chat())
    command = ["prompt", "--model", "scripted", "--mcp-config", str(config), *args, "what time?"]
    return CliRunner().invoke(app, command)


def test_prompt_with_yes_runs_the_call_and_json_has_the_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_prompt(tmp_path, monkeypatch, "--yes", "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["answer"] == "It is daytime in UTC."
    ((step,),) = body["tool_steps"]
    assert step["tool"] == "time.get_current_time" and step["status"] == "ran"
    assert '"timezone": "UTC"' in step["result"]
    logs = tmp_path / "xdg_state_home" / "qwen3-mlx" / "mcp-time.log"
    assert logs.is_file()


def test_prompt_without_consent_declines_and_says_so_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_prompt(tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "I may not check the time."
    assert "declined: prompt runs tools only with --yes" in result.stderr


def test_save_and_load_keep_the_tool_loop_and_render_the_same_prompt(
    manager: McpManager, tmp_path: Path
) -> None:
    from qwen3_mlx.engine import render_prompt

    saved = tmp_path / "loop.json"
    chat, out = run_repl(manager, f"what time is it?\ny\n/save {saved}\n")
    assert "saved" in out
    again, out = run_repl(manager, f"/load {saved}\n")
    assert "loaded" in out and "1 exchange" in out
    assert again.messages == chat.messages and again.turns == chat.turns
    (call,) = [m for m in again.messages if m.get("tool_calls")]
    assert call["tool_calls"][0]["function"]["name"] == "time-get_current_time"
    assert len(tool_messages(again)) == 1 and '"timezone": "UTC"' in tool_messages(again)[0]

    def prompt(chat: Chat) -> list[int]:
        return render_prompt(
            chat.tokenizer, chat.messages, thinking=chat.thinking, tools=chat.tools
        )

    assert prompt(again) == prompt(chat)
    assert "<tool_response>" in chat.tokenizer.decode(prompt(again))
